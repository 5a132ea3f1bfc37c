"""healthgpt eval without a model: data layouts, batched resumable runs, re-scoring, tables, panels."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from healthgpt.cli import CLIError, eval as eval_cli
from healthgpt.cli import build_parser
from healthgpt.cli import main as cli_main
from healthgpt.cli.eval import add_eval_arguments, run_eval
from healthgpt.evaluation.data import load_samples, parse_options
from healthgpt.evaluation.lpips import LPIPS
from healthgpt.evaluation.runner import default_image_loader, read_predictions, repair_jsonl, run_text
from healthgpt.data.images import load_image
from pydicom.data import get_testdata_file


def _pil_loader(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def _args(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args(
        [str(a) for a in argv] + ["--no-progress"])


def _png(path: Path, seed=0, size=32, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = np.full((size, size), value, np.uint8) if value is not None else rng.integers(0, 256, (size, size), np.uint8)
    Image.fromarray(a).convert("RGB").save(path)
    return path


def _write(path: Path, rows, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows))
    return path


class FakeAnswers:
    """answer_batch double: answers from a dict keyed by a substring of the prompt."""

    def __init__(self, table, fail_on_call=None):
        self.table, self.calls, self.prompts, self.fail_on_call = table, 0, [], fail_on_call

    def __call__(self, images, prompts):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt("simulated interruption")
        assert len(images) == len(prompts)
        assert all(isinstance(im, Image.Image) for im in images)
        self.prompts += list(prompts)
        return [next((a for k, a in self.table.items() if k in p), "") for p in prompts]


@pytest.fixture
def slake(tmp_path):
    """SLAKE's public layout: img_name under imgs/, q_lang, answer_type CLOSED/OPEN."""
    d = tmp_path / "slake"
    for i in range(3):
        _png(d / "imgs" / f"xmlab{i}" / "source.jpg".replace(".jpg", ".png"), seed=i)
    rows = [
        dict(qid=1, img_name="xmlab0/source.png", question="Is this a CT?", answer="Yes", answer_type="CLOSED", q_lang="en"),
        dict(qid=2, img_name="xmlab0/source.png", question="Is there a tumor?", answer="No", answer_type="CLOSED", q_lang="en"),
        dict(qid=3, img_name="xmlab1/source.png", question="Which organ is abnormal?", answer="Left Lung", answer_type="OPEN", q_lang="en"),
        dict(qid=4, img_name="xmlab1/source.png", question="这是什么？", answer="肺", answer_type="OPEN", q_lang="zh"),
        dict(qid=5, img_name="xmlab2/source.png", question="How many kidneys?", answer="two", answer_type="OPEN", q_lang="en"),
        dict(qid=6, img_name="xmlab2/source.png", question="Is the liver healthy?", answer="yes", answer_type="CLOSED", q_lang="en"),
    ]
    return _write(d / "test.json", rows)


SLAKE_ANSWERS = {"CT?": "Yes, it is.", "tumor": "There is no tumor.", "abnormal": "the left lung",
                 "kidneys": "2", "liver": "The liver looks fine"}


def test_vqa_run_writes_rows_summary_and_table(slake, tmp_path, capsys):
    out = tmp_path / "run"
    fake = FakeAnswers(SLAKE_ANSWERS)
    assert run_eval(_args("--bench", "slake", "--data", slake, "--out", out, "--batch-size", 2),
                    answer_batch=fake, load_image=_pil_loader) == 0
    assert fake.calls == 3                                    # 5 English questions in batches of 2
    rows = read_predictions(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["1", "2", "3", "5", "6"]
    for r in rows:
        assert {"id", "question", "answer", "prediction", "answer_type", "prompt", "image"} <= set(r)
        assert r["answer_type"] in ("closed", "open") and Path(r["image"]).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["close"] == pytest.approx(200 / 3, abs=1e-3)     # liver: no yes/no word
    assert summary["open"] == 100.0 and summary["all"] == 80.0
    assert summary["n"] == 5 and summary["bench"] == "slake"
    table = (out / "table.md").read_text()
    assert "| Model | close | all | close | all | close | all | MMMU-Med | OMVQA | Avg. |" in table
    assert "| model [strict] | - | - | 66.7 | 80.0 | - | - | - | - | - |" in table
    assert table in capsys.readouterr().out
    scores = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 5 and scores[0]["correct"] is True


def test_resume_after_interruption(slake, tmp_path):
    out = tmp_path / "run"
    args = _args("--bench", "slake", "--data", slake, "--out", out, "--batch-size", 2)
    with pytest.raises(KeyboardInterrupt):
        run_eval(args, answer_batch=FakeAnswers(SLAKE_ANSWERS, fail_on_call=2), load_image=_pil_loader)
    assert [r["id"] for r in read_predictions(out / "predictions.jsonl")] == ["1", "2"]
    assert not (out / "summary.json").exists()
    again = FakeAnswers(SLAKE_ANSWERS)
    assert run_eval(args, answer_batch=again, load_image=_pil_loader) == 0
    assert len(again.prompts) == 3 and not any("CT?" in p or "tumor" in p for p in again.prompts)
    rows = read_predictions(out / "predictions.jsonl")
    assert sorted(r["id"] for r in rows) == ["1", "2", "3", "5", "6"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 5      # no duplicates
    assert json.loads((out / "summary.json").read_text())["all"] == 80.0
    # a finished run does nothing but re-score
    third = FakeAnswers(SLAKE_ANSWERS)
    assert run_eval(args, answer_batch=third, load_image=_pil_loader) == 0 and third.calls == 0


def test_half_written_line_is_redone(slake, tmp_path):
    out = tmp_path / "run"
    args = _args("--bench", "slake", "--data", slake, "--out", out, "--batch-size", 8)
    run_eval(args, answer_batch=FakeAnswers(SLAKE_ANSWERS), load_image=_pil_loader)
    p = out / "predictions.jsonl"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])          # crash mid-write of row 4
    with pytest.warns(UserWarning, match="half-written"):
        assert len(read_predictions(p)) == 3
    again = FakeAnswers(SLAKE_ANSWERS)
    with pytest.warns(UserWarning, match="half-written"):
        run_eval(args, answer_batch=again, load_image=_pil_loader)
    assert len(again.prompts) == 2
    assert [json.loads(l)["id"] for l in p.read_text().splitlines()] == ["1", "2", "3", "5", "6"]
    assert repair_jsonl(p) == 0


def test_rescore_needs_no_model(slake, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_eval(_args("--bench", "slake", "--data", slake, "--out", out),
             answer_batch=FakeAnswers(SLAKE_ANSWERS), load_image=_pil_loader)

    def no_model(*a, **k):
        raise AssertionError("re-scoring must not build a model")
    monkeypatch.setattr("healthgpt.cli.eval.model_from_args", no_model)
    out2 = tmp_path / "rescore"
    assert run_eval(_args("--bench", "slake", "--predictions", out / "predictions.jsonl",
                          "--out", out2, "--open-scoring", "recall")) == 0
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((out2 / "summary.json").read_text())
    for k in ("close", "open", "all", "n"):
        assert a[k] == b[k]
    assert b["model"] == "predictions"


def test_cli_usage_errors(tmp_path, capsys):
    """run_eval raises CLIError; healthgpt.cli.run_guarded (the one error path) reports it."""
    with pytest.raises(CLIError, match="--bench is required"):
        run_eval(_args("--out", tmp_path))
    with pytest.raises(CLIError, match="give --data"):
        run_eval(_args("--bench", "slake", "--out", tmp_path))
    with pytest.raises(CLIError, match="no such predictions file"):
        run_eval(_args("--bench", "slake", "--predictions", tmp_path / "none.jsonl", "--out", tmp_path))
    assert capsys.readouterr().err == ""  # nothing printed by run_eval itself
    assert cli_main(["eval", "--bench", "slake", "--out", str(tmp_path)]) == 2
    assert "healthgpt: error: give --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--bench", "nope", "--out", tmp_path)
    assert "error" in capsys.readouterr().err


def test_vqa_rad_layout_and_loader_rules(tmp_path):
    d = tmp_path / "rad"
    _png(d / "VQA_RAD Image Folder" / "synpic1.png")
    rows = {"a": dict(image_name="synpic1.png", question="How many?", answer=2, answer_type="CLOSED "),
            "b": dict(image_name="synpic1.png", question="Normal?", answer="yes"),
            "c": dict(image_name="synpic1.png", question="Where?", answer="left lobe")}
    s = load_samples("vqa-rad", _write(d / "rad.json", rows))
    assert [x["id"] for x in s] == ["a", "b", "c"]
    assert [x["answer_type"] for x in s] == ["closed", "closed", "open"] and s[0]["answer"] == "2"
    assert Path(s[0]["image"]).exists() and "VQA_RAD Image Folder" in s[0]["image"]
    with pytest.raises(ValueError, match="duplicate"):
        load_samples("vqa-rad", _write(d / "dup.jsonl", [dict(id=1, question="q", answer="yes")] * 2, jsonl=True))
    assert len(load_samples("vqa-rad", d / "rad.json", limit=2)) == 2
    assert parse_options({"options": "['a', 'b']"}) == ["a", "b"]
    assert parse_options({"options": {"B": "y", "A": "x"}}) == ["x", "y"]
    assert parse_options({"option_A": "x", "option_B": "y", "option_C": None}) == ["x", "y"]
    assert parse_options({"question": "q"}) is None


def test_omnimedvqa_layout_per_modality(tmp_path):
    d = tmp_path / "omni"
    _png(d / "Images" / "a.png")
    mods = ["CT(Computed Tomography)", "CT(Computed Tomography)", "Ultrasound", "X-Ray"]
    rows = [dict(question_id=f"q{i}", image_path="Images/a.png", question="Which organ?",
                 option_A="Liver", option_B="Lung", option_C="Heart", option_D="Kidney",
                 gt_answer="Lung", modality_type=m, question_type="Anatomy Identification")
            for i, m in enumerate(mods)]
    out = tmp_path / "run"
    answers = iter(["B", "Kidney", "(B) Lung", "heart"])
    fake = lambda imgs, prompts: [next(answers) for _ in prompts]      # noqa: E731
    assert run_eval(_args("--bench", "omnimedvqa", "--data", _write(d / "omni.json", rows), "--out", out),
                    answer_batch=fake, load_image=_pil_loader) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["CT"] == 50.0 and s["USS"] == 100.0 and s["X-ray"] == 0.0
    assert s["accuracy"] == 50.0 and s["accuracy_micro"] == 50.0
    rows_out = read_predictions(out / "predictions.jsonl")
    assert rows_out[0]["options"] == ["Liver", "Lung", "Heart", "Kidney"] and rows_out[0]["modality"] == mods[0]
    assert "A. Liver\nB. Lung" in rows_out[0]["prompt"]
    table = (out / "table.md").read_text()
    assert "| Model | CT | X-ray | FDM | MiS | OCT | MRI | USS | Avg. |" in table
    assert "| 50.0 | 0.0 | - | - | - | - | 100.0 | 50.0 |" in table


def test_mmmu_letter_answers_from_predictions_file(tmp_path):
    rows = [dict(id="1", question="q", answer="C", prediction="C", answer_type="closed", options=["x", "y", "z"]),
            dict(id="2", question="q", answer="A", prediction="The answer is (B)", answer_type="closed", options=["x", "y"])]
    p = _write(tmp_path / "p.jsonl", rows, jsonl=True)
    assert run_eval(_args("--bench", "mmmu-med", "--predictions", p, "--out", tmp_path / "o")) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["accuracy"] == 50.0 and s["n"] == 2


@pytest.fixture
def conversion(tmp_path):
    d = tmp_path / "mc"
    rows = []
    for i, task in enumerate(["MRI to CT (Brain)", "CT to MRI (Brain)", "CT to MRI (Brain)"]):
        rows.append(dict(id=f"s/{i}", image=str(_png(d / f"in{i}.png", seed=i).relative_to(d)),
                         target=f"tgt{i}.png", task=task))
        _png(d / f"tgt{i}.png", seed=10 + i, size=48)
    return _write(d / "data.jsonl", rows, jsonl=True)


def _fake_generate(calls):
    def gen(images, instructions):
        calls.append(list(instructions))
        return [Image.fromarray(255 - np.asarray(im.resize((32, 32)))) for im in images]
    return gen


def test_image_task_run_panels_and_unavailable_lpips(conversion, tmp_path):
    out = tmp_path / "run"
    calls = []
    assert run_eval(_args("--bench", "modality-conversion", "--data", conversion, "--out", out,
                          "--batch-size", 2), generate_batch=_fake_generate(calls), load_image=_pil_loader) == 0
    assert [len(c) for c in calls] == [2, 1]
    assert calls[0][0] == "Convert this MRI image into the corresponding CT image."
    rows = read_predictions(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["s/0", "s/1", "s/2"]
    for r in rows:
        assert (out / r["prediction"]).exists() and {"image", "target", "instruction", "task"} <= set(r)
    panels = sorted((out / "panels").glob("*.png"))
    assert len(panels) == 3 and Image.open(panels[0]).size == (3 * 256, 256 + 36)
    s = json.loads((out / "summary.json").read_text())
    assert s["lpips"] is None and s["lpips_status"].startswith("unavailable")
    assert list(s["tasks"]) == ["CT to MRI (Brain)", "MRI to CT (Brain)"]       # paper order
    assert s["tasks"]["CT to MRI (Brain)"]["n"] == 2 and s["resized_targets"] == 3
    for t in [s] + list(s["tasks"].values()):
        assert -100 <= t["ssim"] <= 100 and t["psnr"] > 0 and 0 <= t["mse"] <= 255 ** 2
    table = (out / "table.md").read_text()
    assert "|  | CT to MRI (Brain) |  |  | MRI to CT (Brain) |  |  |" in table
    assert "| Model | SSIM ↑ | PSNR ↑ | MSE ↓ | SSIM ↑ | PSNR ↑ | MSE ↓ |" in table
    # re-score from the predictions file alone gives the same numbers
    assert run_eval(_args("--bench", "modality-conversion", "--predictions", out / "predictions.jsonl",
                          "--out", tmp_path / "re", "--no-panels"), load_image=_pil_loader) == 0
    s2 = json.loads((tmp_path / "re" / "summary.json").read_text())
    assert s2["tasks"] == s["tasks"] and not (tmp_path / "re" / "panels").exists()


def test_super_resolution_with_local_lpips_weights(conversion, tmp_path):
    torch.manual_seed(0)
    net = LPIPS("alex")
    sd = {k: v.abs() if k.startswith("lins.") else v for k, v in net.state_dict().items()}
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, tmp_path / "alexnet.pth")
    torch.save({f"lin{k.split('.')[1]}.model.1.weight": v for k, v in sd.items() if k.startswith("lins.")},
               tmp_path / "alex.pth")
    out = tmp_path / "sr"
    assert run_eval(_args("--bench", "super-resolution", "--data", conversion, "--out", out, "--no-panels",
                          "--lpips-weights", tmp_path / "alexnet.pth", tmp_path / "alex.pth"),
                    generate_batch=_fake_generate([]), load_image=_pil_loader) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["lpips_status"] == "ok" and s["lpips"] > 0
    table = (out / "table.md").read_text()
    assert "|  | MRI to CT (Brain) |  |  |  | CT to MRI (Brain) |" in table    # two tasks: grouped
    out2 = tmp_path / "sr2"
    run_eval(_args("--bench", "super-resolution", "--data", conversion, "--out", out2, "--no-panels", "--limit", 1),
             generate_batch=_fake_generate([]), load_image=_pil_loader)
    t2 = (out2 / "table.md").read_text()
    head = t2.split("Details")[0]
    assert "| Model | SSIM ↑ | PSNR ↑ | MSE ↓ | LPIPS ↓ |" in head and "|  |" not in head   # Table 3 layout
    assert head.rstrip().endswith("| n/a |")


def test_combine_prints_paper_tables(slake, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_eval(_args("--bench", "slake", "--data", slake, "--out", a, "--model-name", "M"),
             answer_batch=FakeAnswers(SLAKE_ANSWERS), load_image=_pil_loader)
    rows = [dict(id="1", question="q", answer="Lung", prediction="B", answer_type="closed",
                 options=["Liver", "Lung"], modality="OCT")]
    run_eval(_args("--bench", "omnimedvqa", "--predictions", _write(tmp_path / "p.jsonl", rows, jsonl=True),
                   "--out", b, "--model-name", "M"))
    assert run_eval(_args("--combine", a, b, "--out", tmp_path / "t")) == 0
    text = (tmp_path / "t" / "tables.md").read_text()
    assert "| M [strict] | - | - | 66.7 | 80.0 | - | - | - | 100.0 | - |" in text
    assert "| M [strict] | - | - | - | - | 100.0 | - | - | 100.0 |" in text


def test_runner_rejects_wrong_answer_count(tmp_path):
    samples = [dict(id="1", question="q", answer="yes", answer_type="closed", image=None)]
    with pytest.raises(RuntimeError, match="answers"):
        run_text("vqa-rad", samples, lambda i, p: [], tmp_path, progress=False)


def test_stand_alone_main(tmp_path, capsys):
    # the stand-alone entry point parses like `healthgpt eval` and runs the real command
    assert eval_cli.main(["--bench", "slake", "--predictions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "no such predictions file" in capsys.readouterr().err


def test_dicom_targets_through_the_default_loader(tmp_path):
    assert default_image_loader() is load_image  # the one reader training data and inference use
    ct = get_testdata_file("CT_small.dcm")
    data = _write(tmp_path / "d.jsonl", [dict(id="ct", image=ct, target=ct, task="CT(Brain)")], jsonl=True)
    out = tmp_path / "run"
    echo = lambda images, instr: [im.copy() for im in images]      # noqa: E731  (the "echo" failure mode)
    assert run_eval(_args("--bench", "reconstruction", "--data", data, "--out", out), generate_batch=echo) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["ssim"] == 100.0 and s["mse"] == 0.0 and s["psnr"] is None and s["psnr_identical"] == 1
    assert (out / "panels" / "ct.png").exists()


def test_registers_as_healthgpt_subcommand(slake, tmp_path):
    parser = build_parser({"eval": "healthgpt.cli.eval:register"})
    rows = [dict(id="1", question="q", answer="yes", prediction="yes", answer_type="closed")]
    args = parser.parse_args(["eval", "--bench", "vqa-rad", "--predictions",
                              str(_write(tmp_path / "p.jsonl", rows, jsonl=True)), "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["close"] == 100.0
