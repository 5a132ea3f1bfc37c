"""End to end: ``healthgpt eval`` on the tiny HealthGPT (random weights) over a few samples.

Random weights: these tests check structure (files, complete rows, finite in-range metrics,
resume), never accuracy.
"""

import argparse
import json
import math

import numpy as np
import pytest
from PIL import Image

from healthgpt.cli import model_from_args
from healthgpt.cli.eval import add_eval_arguments, run_eval
from healthgpt.evaluation.runner import read_predictions


@pytest.fixture(scope="module")
def tiny():
    with pytest.warns(UserWarning, match="meaningless"):
        return model_from_args(argparse.Namespace(weights=None, device="cpu", seed=0))


@pytest.fixture
def use_tiny(tiny, monkeypatch):
    """run_eval builds its model through model_from_args: hand it the one built for this module,
    counting the samples the model is asked about."""
    seen = []
    orig_answer, orig_generate = tiny.answer_batch, tiny.generate_images

    def answer_batch(images, questions, **kw):
        seen.extend(questions)
        return orig_answer(images, questions, **kw)

    def generate_images(images, instructions, **kw):
        seen.extend(instructions)
        return orig_generate(images, instructions, **kw)

    monkeypatch.setattr(tiny, "answer_batch", answer_batch, raising=False)
    monkeypatch.setattr(tiny, "generate_images", generate_images, raising=False)
    monkeypatch.setattr("healthgpt.cli.eval.model_from_args", lambda args: tiny)
    return seen


def _args(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv] + ["--no-progress"])


def _png(path, seed):
    a = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), np.uint8)
    Image.fromarray(a).save(path)
    return path.name


def test_vqa_end_to_end_and_resume(use_tiny, tmp_path):
    rows = [dict(id=f"q{i}", image=_png(tmp_path / f"i{i}.png", i), question=q, answer=a)
            for i, (q, a) in enumerate([("Is there a fracture?", "no"), ("Which organ is shown?", "liver"),
                                        ("Is this an MRI?", "yes")])]
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = _args("--bench", "vqa-rad", "--data", data, "--out", out, "--batch-size", 2, "--max-new-tokens", 4)
    assert run_eval(args) == 0
    assert len(use_tiny) == 3
    preds = read_predictions(out / "predictions.jsonl")
    assert [r["id"] for r in preds] == ["q0", "q1", "q2"]
    for r in preds:
        assert isinstance(r["prediction"], str)
        assert r["answer_type"] == ("open" if r["id"] == "q1" else "closed")
    s = json.loads((out / "summary.json").read_text())
    for k in ("close", "open", "all"):
        assert s[k] is not None and 0.0 <= s[k] <= 100.0 and math.isfinite(s[k])
    assert s["n"] == 3 and s["notes"] and "meaningless" in s["notes"][0]
    assert "| Model | close | all |" in (out / "table.md").read_text()

    # interruption after the first row: only the two missing ids are asked again
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text(lines[0] + "\n")
    use_tiny.clear()
    assert run_eval(args) == 0
    assert len(use_tiny) == 2 and "Is there a fracture?" not in use_tiny
    after = (out / "predictions.jsonl").read_text().splitlines()
    assert after[0] == lines[0] and len(after) == 3


def test_multiple_choice_end_to_end(use_tiny, tmp_path):
    rows = [dict(question_id=f"m{i}", image_path=_png(tmp_path / f"m{i}.png", 10 + i), question="Which organ?",
                 option_A="Liver", option_B="Lung", gt_answer="Lung", modality_type=m)
            for i, m in enumerate(["CT(Computed Tomography)", "Ultrasound"])]
    data = tmp_path / "omni.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "omni"
    assert run_eval(_args("--bench", "omnimedvqa", "--data", data, "--out", out, "--max-new-tokens", 3)) == 0
    assert len(use_tiny) == 2
    s = json.loads((out / "summary.json").read_text())
    assert s["CT"] in (0.0, 100.0) and s["USS"] in (0.0, 100.0) and 0.0 <= s["accuracy"] <= 100.0
    assert all("A. Liver\nB. Lung" in r["prompt"] for r in read_predictions(out / "predictions.jsonl"))


@pytest.mark.slow
def test_image_task_end_to_end(use_tiny, tmp_path):
    # one sample: the tiny model still decodes all 1024 codes (~30 s on a busy 2-core CPU)
    rows = [dict(id="g/0", image=_png(tmp_path / "g0.png", 20), target=_png(tmp_path / "t0.png", 30),
                 task="CT to MRI (Brain)")]
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gen"
    args = _args("--bench", "modality-conversion", "--data", data, "--out", out)
    assert run_eval(args) == 0
    assert use_tiny == ["Convert this CT image into the corresponding MRI image."]
    (r,) = read_predictions(out / "predictions.jsonl")
    assert r["id"] == "g/0" and Image.open(out / r["prediction"]).size == (256, 256)
    assert len(list((out / "panels").glob("g_0_*.png"))) == 1
    s = json.loads((out / "summary.json").read_text())
    assert list(s["tasks"]) == ["CT to MRI (Brain)"] and s["n"] == 1
    assert -100 <= s["ssim"] <= 100 and 0 <= s["mse"] <= 255 ** 2
    assert s["psnr"] is None or math.isfinite(s["psnr"])
    assert s["lpips"] is None and s["lpips_status"].startswith("unavailable")
    assert "| Model | SSIM ↑ | PSNR ↑ | MSE ↓ |" in (out / "table.md").read_text()
    use_tiny.clear()
    assert run_eval(args) == 0 and use_tiny == []          # finished: nothing regenerated
