"""Reliability of ``healthgpt eval`` (issue 12): duplicate ids, empty and half-written prediction
files, every malformed row as one line naming it, and predictions scored with the wrong benchmark
family, through the real CLI (``healthgpt eval ...`` exits 2 with ``healthgpt: error: ...``)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from healthgpt.cli import main as cli_main
from healthgpt.evaluation.runner import PredictionsError, read_predictions, repair_jsonl, run_text


def _eval(*argv):
    try:
        return cli_main(["eval", *[str(a) for a in argv], "--no-progress"])
    except SystemExit as e:
        return e.code


def _errors(capsys) -> list:
    """The error lines on stderr (a library's import-time notice may precede them), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("healthgpt: error: ")]


def _rows(n=3):
    return [{"id": f"q{i}", "question": f"Is it {i}?", "answer": "yes" if i % 2 else "no",
             "prediction": "yes", "answer_type": "closed"} for i in range(n)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_duplicate_prediction_ids_are_an_error_naming_them(tmp_path, capsys):
    rows = _rows(4) + [dict(_rows(4)[1], prediction="no"), dict(_rows(4)[3])]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(PredictionsError, match=r"2 ids occur more than once: 'q1' \(lines 2, 5\), 'q3' \(lines 4, 6\)"):
        read_predictions(path)
    assert _eval("--bench", "vqa-rad", "--predictions", path, "--out", tmp_path / "o") == 2
    assert "'q1' (lines 2, 5)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_empty_predictions_file_is_an_error(tmp_path, capsys):
    for text in ("", "\n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        assert _eval("--bench", "slake", "--predictions", path, "--out", tmp_path / "o") == 2
        assert "empty.jsonl: no predictions in the file" in capsys.readouterr().err
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize("tail", [b'{"id": "q3", "question": "Is', b'{"id": "q3", "question": "Is\n', b'[1, 2]\n'])
def test_half_written_last_row_is_reported_and_dropped_for_resume_and_rescoring(tmp_path, tail):
    """A crash left a partial last row (with or without a newline after it): re-scoring skips it
    with a warning, resume cuts it and predicts that sample again, and the file is whole after."""
    whole = _rows(3)
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(_jsonl(path, whole).read_bytes() + tail)
    with pytest.warns(UserWarning, match="half-written last row"):
        assert [r["id"] for r in read_predictions(path)] == ["q0", "q1", "q2"]
    samples = [{k: r[k] for k in ("id", "question", "answer", "answer_type")} | {"image": None} for r in _rows(5)]
    asked = []

    def answer(images, prompts):
        asked.extend(prompts)
        return ["no"] * len(prompts)

    with pytest.warns(UserWarning, match="removed a half-written last row"):
        rows = run_text("slake", samples, answer, tmp_path, progress=False)
    assert asked == ["Is it 3?", "Is it 4?"] and [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert repair_jsonl(path) == 0 and len(read_predictions(path, bench="slake")) == 5


BAD_ROWS = [
    ({"question": "q", "answer": "yes", "prediction": "yes"}, r":2: row without an 'id'"),
    ({"id": None, "answer": "yes", "prediction": "yes"}, r":2: row without an 'id'"),
    ({"id": "b", "question": "q", "prediction": "yes"}, r":2 \(id 'b'\): 'answer' is missing"),
    ({"id": "b", "question": "q", "answer": "yes", "prediction": None}, r":2 \(id 'b'\): 'prediction' is null"),
    ({"id": "b", "question": "q", "answer": ["yes"], "prediction": "yes"}, r":2 \(id 'b'\): 'answer' is a list, not text"),
    ({"id": "b", "question": "q", "answer": "yes", "prediction": "yes", "answer_type": "multi"},
     r":2 \(id 'b'\): unknown answer_type 'multi'"),
    ({"id": "b", "question": "q", "answer": "yes", "prediction": "yes", "options": "yes,no"},
     r":2 \(id 'b'\): 'options' must be a list of strings"),
    (["b", "yes"], r":2: a row must be a JSON object, got list"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_every_malformed_eval_row_is_one_line_naming_the_row(tmp_path, capsys, bad, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_rows(1)[0]) + "\n" + json.dumps(bad) + "\n" + json.dumps(_rows(3)[2]) + "\n")
    with pytest.raises(PredictionsError, match=message):
        read_predictions(path, bench="vqa-rad")
    assert _eval("--bench", "vqa-rad", "--predictions", path, "--out", tmp_path / "o") == 2
    err = _errors(capsys)
    assert len(err) == 1 and "p.jsonl:2" in err[0]


def test_non_utf8_and_non_json_rows_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    good = json.dumps(_rows(1)[0]).encode() + b"\n"
    path.write_bytes(good + b'{"id": "b", "answer": "caf\xe9", "prediction": "x"}\n' + good.replace(b"q0", b"q9"))
    with pytest.raises(PredictionsError, match=r"p\.jsonl:2: not UTF-8 \(byte 26 of the line is b'\\xe9'\)"):
        read_predictions(path)
    path.write_bytes(good + b"{'id': 'b'}\n" + good.replace(b"q0", b"q9"))
    with pytest.raises(PredictionsError, match=r"p\.jsonl:2: not JSON"):
        read_predictions(path)


def test_vqa_predictions_scored_with_an_image_bench_are_refused(tmp_path, capsys):
    path = _jsonl(tmp_path / "p.jsonl", _rows(3))
    assert _eval("--bench", "modality-conversion", "--predictions", path, "--out", tmp_path / "o") == 2
    assert "holds question/answer (VQA or multiple-choice) predictions, not image predictions" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "t.png")
    images = _jsonl(tmp_path / "i.jsonl", [{"id": "s1", "image": "t.png", "target": "t.png", "prediction": "t.png"}])
    assert _eval("--bench", "slake", "--predictions", images, "--out", tmp_path / "o") == 2
    assert "holds image predictions (target images), not answers" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (["q", "yes"], r"row 1 is a list, not an object"),
    ({"id": "q0", "question": "Again?", "answer": "no"}, r"row 1: duplicate id 'q0'"),
    ({"id": "b", "question": ["Is it?"], "answer": "yes"}, r"row 'b': 'question' and the answer must be text"),
    ({"id": "b", "question": "Is it?", "answer": "yes", "answer_type": "maybe"}, r"row 'b': unknown answer_type 'maybe'"),
    ({"id": "b", "question": "Is it?", "answer": None}, r"row 'b' needs 'question' and an answer"),
])
def test_malformed_benchmark_rows_are_one_line_before_any_model(tmp_path, capsys, bad, message):
    data = _jsonl(tmp_path / "test.jsonl", [{"id": "q0", "question": "Is it?", "answer": "yes"}, bad])
    assert _eval("--bench", "slake", "--data", data, "--out", tmp_path / "o") == 2
    err = _errors(capsys)
    assert len(err) == 1 and re.search(message, err[0]), err
