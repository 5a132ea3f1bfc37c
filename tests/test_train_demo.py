"""``healthgpt demo`` end to end on the CPU: stages 1 -> 2 -> 3, a question, an image, falling losses."""

import argparse
import json
import os

import pytest
from PIL import Image

from healthgpt.training.demo import add_demo_arguments, demo, loss_fell, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on a shared CPU


@pytest.mark.slow
def test_demo_runs_and_losses_fall(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = demo(out=str(out), cache_dir=str(tmp_path / "cache"))
    printed = capsys.readouterr().out
    assert [s["stage"] for s in summary["stages"]] == [1, 2, 3]
    for s in summary["stages"]:
        assert s["fell"], f"stage {s['stage']} loss {s['loss_start']:.4f} -> {s['loss_end']:.4f}"
        assert os.path.isfile(os.path.join(s["output"], "loss_curve.png"))
        assert os.path.isfile(os.path.join(s["output"], "stage.json"))
    assert summary["losses_fell"]
    # each stage starts from the previous one's output folder
    inits = [json.load(open(os.path.join(s["output"], "stage.json")))["init"] for s in summary["stages"]]
    assert inits == [None, summary["stages"][0]["output"], summary["stages"][1]["output"]]
    # stage 2 (the fusion layer) takes the loss down hard
    s2 = summary["stages"][1]
    assert s2["loss_end"] < 0.7 * s2["loss_start"]
    assert isinstance(summary["question"]["answer"], str)
    img = Image.open(summary["generation"]["output"])
    assert img.size == (64, 64) and summary["generation"]["image_tokens"] == 64
    assert os.path.isfile(out / "loss_curves.png") and os.path.isfile(out / "summary.json")
    assert "stage 3:" in printed and "generated 64x64 image" in printed


def test_demo_arguments_and_loss_helper():
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(["--out", "x", "--steps", "5"])
    assert (args.out, args.steps, args.image_size) == ("x", 5, 64) and callable(run_demo)
    rows = [{"loss": v} for v in (9, 8, 7, 6, 5, 4)]
    assert loss_fell(rows) == (8.5, 4.5)
    assert loss_fell([]) == (None, None)


def test_subcommands_register_with_the_healthgpt_cli():
    from healthgpt.cli import build_parser

    parser = build_parser({"train": "healthgpt.cli.train:register", "demo": "healthgpt.training.demo:register",
                           "data": "healthgpt.cli.data:register"})
    args = parser.parse_args(["train", "--stage", "3", "--task", "gen", "--data", "d.json", "--output", "o", "--preset", "m3"])
    assert (args.stage, args.task, args.preset, args.func.__name__) == (3, "gen", "m3", "run_train")
    assert parser.parse_args(["demo"]).func.__name__ == "run_demo"
    assert parser.parse_args(["data", "convert", "ixi", "/x", "--out", "y.json"]).func.__name__ == "run_data"
