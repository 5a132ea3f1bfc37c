"""Reliability of training files (issue 12): one validator for ``data check`` and ``train``, errors
that name the real place (JSON line/column, byte offset of non-UTF-8 text), unreadable images
skipped by ``--skip-bad``, empty questions refused, long questions reported as too long and long
answers cut with a warning."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from healthgpt.cli import main as cli_main
from healthgpt.constants import IGNORE_INDEX
from healthgpt.data import DataError, load_samples
from healthgpt.data.dataset import TrainingDataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return str(path)


def _row(rid, image="img/a.png", question="What is it?", answer="CT"):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _data_check(path, *extra):
    try:
        return cli_main(["data", "check", str(path), *extra])
    except SystemExit as e:
        return e.code


def test_unreadable_image_is_one_bad_row_for_check_and_train_and_skip_bad_skips_it(tmp_path, capsys):
    """An image that exists but does not decode: ``data check`` and the loader ``train`` uses reject
    the file alike (exit 2, the row and the file named); ``--skip-bad`` drops and counts it."""
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([_row("good"), _row("bad", image="img/broken.png")]))
    with pytest.raises(DataError, match=r"row 1 \(id 'bad'\): image cannot be read: .*broken\.png"):
        load_samples(path)
    assert _data_check(path) == 2
    assert "row 1 (id 'bad'): image cannot be read" in capsys.readouterr().err
    samples, report = load_samples(path, skip_bad=True)
    assert [s.id for s in samples] == ["good"] and report.skipped == {"unreadable image": 1}
    assert _data_check(path, "--skip-bad") == 1  # valid rows remain, bad ones reported
    assert "1 unreadable image" in capsys.readouterr().out


def test_pretty_printed_json_errors_give_the_real_line_and_column(tmp_path):
    rows = [_row("a"), _row("b")]
    text = json.dumps(rows, indent=2).splitlines()
    broken = next(i for i, line in enumerate(text) if '"b"' in line)
    text[broken] = text[broken].replace('"b",', '"b"')  # a missing comma
    path = tmp_path / "pretty.json"
    path.write_text("\n".join(text))
    with pytest.raises(DataError, match=rf"pretty\.json: is not JSON: Expecting ',' delimiter at line {broken + 2}, column \d+"):
        load_samples(path)
    # a JSON Lines file under a .json name still names its own bad line
    _png(tmp_path / "img" / "a.png")
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(_row("a")) + "\n" + '{"id": "b", \n')
    with pytest.raises(DataError, match=r"lines\.json: line 2 is not JSON"):
        load_samples(lines)


def test_latin1_file_error_names_the_file_and_byte_offset(tmp_path):
    text = json.dumps([_row("a", question="Is the lesion ")], ensure_ascii=False)
    raw = text.replace("lesion ", "lésion ").encode("latin-1")
    path = tmp_path / "latin.json"
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(DataError, match=rf"latin\.json: not UTF-8 text: byte {offset} \(line 1\) is b'\\xe9'"):
        load_samples(path)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a UTF-8 byte-order mark is fine
    _png(tmp_path / "img" / "a.png")
    assert load_samples(path)[0][0].conversations[0]["value"].endswith("Is the lesion ")


@pytest.mark.parametrize("question", ["", "   ", "<image>", "<image>\n  "])
def test_empty_question_is_a_bad_row(tmp_path, question):
    _png(tmp_path / "img" / "a.png")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_row("ok")) + "\n" + json.dumps(_row("empty", question=question)) + "\n")
    with pytest.raises(DataError, match=r"row 1 \(id 'empty'\): conversation turn 0 \(human\) is empty"):
        load_samples(path)
    assert load_samples(path, skip_bad=True)[1].skipped == {"empty question": 1}


@pytest.fixture(scope="module")
def tiny():
    from healthgpt.model.config import TINY_VQ, HealthGPTConfig
    from healthgpt.model.healthgpt import HealthGPT

    torch.manual_seed(0)
    return HealthGPT(HealthGPTConfig.preset("tiny", image_tokenizer_config=dict(TINY_VQ, resolution=32)))


def test_long_question_is_reported_too_long_and_long_answer_is_cut_with_a_warning(tmp_path, tiny):
    """The same rows through the model's own ``prepare_sample``: a prompt that fills max_length is
    'too long' with both lengths (not 'no assistant turn'); a long answer is cut to max_length,
    its first tokens kept exactly, with one warning naming the row."""
    _png(tmp_path / "img" / "a.png", 90)
    path = tmp_path / "t.json"
    path.write_text(json.dumps([_row("short"), _row("long-q", question="lesion " * 400),
                                _row("long-a", answer="the lesion is benign " * 200)]))
    samples, _ = load_samples(path)
    full = TrainingDataset(samples, tiny.prepare_sample)
    lengths = [len(full[i]["input_ids"]) for i in range(3)]
    prompt_a = int((full[2]["labels"] != IGNORE_INDEX).nonzero()[0, 0])
    limit = (prompt_a + lengths[2]) // 2
    assert lengths[0] < limit < lengths[2] and lengths[1] > limit
    ds = TrainingDataset(samples, tiny.prepare_sample, max_length=limit)
    assert torch.equal(ds[0]["input_ids"], full[0]["input_ids"])
    with pytest.raises(DataError, match=rf"id 'long-q'\): the question is too long: its prompt .* is \d+ tokens, max_length is {limit}"):
        ds[1]
    with pytest.warns(UserWarning, match=rf"id 'long-a'\): {lengths[2]} tokens cut to max_length={limit}"):
        cut = ds[2]
    assert torch.equal(cut["input_ids"], full[2]["input_ids"][:limit]) and torch.equal(cut["labels"], full[2]["labels"][:limit])
    assert (cut["labels"] != IGNORE_INDEX).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per row
        ds[2]
