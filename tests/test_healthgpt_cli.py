"""The ``healthgpt`` command on the tiny preset."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from healthgpt import HealthGPT
from healthgpt.cli import SUBCOMMANDS, build_parser, main, model_from_args


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8))


def test_answer_on_the_tiny_preset_warns_and_prints(capsys):
    with pytest.warns(UserWarning, match="tiny preset with random weights"):
        status = main(["answer", "--image", get_testdata_file("MR_small.dcm"), "--question", "What is shown?",
                       "--max-new-tokens", "4"])
    assert status == 0
    assert capsys.readouterr().out.endswith("\n")


def test_generate_writes_a_256px_image(tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out.png"
    with pytest.warns(UserWarning, match="untrained"):
        status = main(["generate", "--image", str(src), "--instruction", "Convert to MRI.", "--out", str(out)])
    assert status == 0 and capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.size == (256, 256) and im.mode == "RGB"


def test_weights_directory(tmp_path, capsys):
    """--weights loads the saved weights: the model model_from_args builds from them computes what the
    saved model computes, unlike a fresh random one, and the CLI prints the saved model's answer."""
    torch.manual_seed(123)  # not the CLI's --seed 0, so the saved weights differ from the default random ones
    saved = HealthGPT("tiny").eval()
    saved.save_pretrained(tmp_path / "w")
    batch = saved.collate([saved.prepare_sample([{"from": "human", "value": "<image>\nWhat is it?"},
                                                 {"from": "gpt", "value": "A CT."}], "comp", image=_image(5))])

    def logits(model):
        with torch.no_grad():
            return model(**batch).logits

    loaded = model_from_args(argparse.Namespace(weights=str(tmp_path / "w"), device="cpu", seed=0))
    with pytest.warns(UserWarning, match="tiny preset"):
        fresh = model_from_args(argparse.Namespace(weights=None, device="cpu", seed=0))
    want = logits(saved)
    assert torch.equal(logits(loaded), want)
    assert (logits(fresh) - want).abs().max() > 1e-2
    argv = ["answer", "--question", "Hello?", "--max-new-tokens", "6", "--device", "cpu"]
    assert main(argv + ["--weights", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().out == saved.answer(None, "Hello?", max_new_tokens=6) + "\n"


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["answer", "--image", str(tmp_path / "missing.dcm"), "--question", "?"]) == 2
    assert "missing.dcm: no such file" in capsys.readouterr().err
    assert main(["answer", "--weights", str(tmp_path / "nothing"), "--question", "?"]) == 2
    assert "not a HealthGPT weights directory" in capsys.readouterr().err
    assert main(["generate", "--instruction", "x", "--out", str(tmp_path / "no" / "dir" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["answer"])  # argparse: --question is required


def test_subcommand_registry_is_extensible():
    assert {"answer", "generate", "convert-vqgan", "convert-release"} <= set(SUBCOMMANDS)
    parser = build_parser({"answer": "healthgpt.cli.infer:register_answer"})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"answer"}
