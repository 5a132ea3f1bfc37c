"""Issue 12, command-line options: a bad option is one line (exit 2) before any model or image is loaded."""

import pytest
import torch

import healthgpt.cli as cli
from healthgpt.cli import main
from healthgpt.training.arguments import TrainArguments, TrainError


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or an image fails the test: every check here must come first."""
    def forbidden(*a, **k):
        raise AssertionError("a model or image was loaded before the options were checked")

    monkeypatch.setattr(cli, "model_from_args", forbidden)
    monkeypatch.setattr(cli, "image_from_args", forbidden)
    import healthgpt.cli.infer as infer

    monkeypatch.setattr(infer, "model_from_args", forbidden)
    monkeypatch.setattr(infer, "image_from_args", forbidden)


@pytest.mark.parametrize("options, message", [
    (["--max-new-tokens", "-5"], "--max-new-tokens must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--top-p", "2"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--sample", "--temperature", "0"], "--temperature 0 with --sample"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_answer_refuses_out_of_range_decoding_options_before_loading(no_model, capsys, options, message):
    assert main(["answer", "--question", "Q?", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("healthgpt: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err)


def test_generate_refuses_bad_decoding_options_before_loading(no_model, tmp_path, capsys):
    assert main(["generate", "--instruction", "MRI", "--out", str(tmp_path / "x.png"), "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", [["answer", "--question", "Q?"], ["generate", "--instruction", "MRI", "--out", "o.png"]])
def test_device_cuda_without_cuda_refused_before_loading(no_model, capsys, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err


def test_unknown_device_refused_before_loading(no_model, capsys):
    assert main(["answer", "--question", "Q?", "--device", "tpu7"]) == 2
    assert "--device 'tpu7' is not a torch device" in capsys.readouterr().err


def test_valid_decoding_options_pass_the_check():
    import argparse

    ok = argparse.Namespace(max_new_tokens=1, top_k=1, top_p=1.0, temperature=0.0, sample=False, seed=0)
    cli.check_decoding_arguments(ok)  # greedy with temperature 0 is fine
    assert cli.decoding_kwargs(ok)["top_p"] == 1.0


# ---- healthgpt train options (TrainArguments) ---------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("max_steps", 0, "--max-steps must be positive"),
    ("max_steps", -3, "--max-steps must be positive"),
    ("projector_lr", float("nan"), "--projector-lr must be a finite number"),
    ("lr", float("inf"), "--lr must be a finite number"),
    ("lr", 0.0, "--lr must be positive"),
    ("epochs", -1.0, "--epochs must be positive"),
    ("warmup_ratio", 1.5, r"--warmup-ratio must be in \[0, 1\)"),
    ("dropout", -0.1, r"--dropout must be in \[0, 1\)"),
    ("weight_decay", -0.01, "--weight-decay must not be negative"),
    ("global_batch_size", 0, "--global-batch-size must be positive"),
])
def test_train_refuses_out_of_range_numbers(option, value, message):
    with pytest.raises(TrainError, match=message):
        TrainArguments(stage=1, task="comp", data="d.json", output="out", **{option: value})


def test_train_refuses_output_equal_to_init_after_resolving_paths(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    for init, output in (("model", "model/"), ("model", str(tmp_path / "model")), ("link", "./model")):
        with pytest.raises(TrainError, match="is the --init model itself"):
            TrainArguments(stage=2, data="d.json", output=output, init=init)


def test_train_cli_refuses_max_steps_zero_and_nan_lr_in_one_line(capsys, tmp_path):
    from healthgpt.cli import user_errors  # noqa: F401  (the CLI reports TrainError as one line)

    for options in (["--max-steps", "0"], ["--projector-lr", "nan"]):
        code = main(["train", "--stage", "1", "--task", "comp", "--data", "d.json", "--output", str(tmp_path / "o"), *options])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("healthgpt: error: ") and err.count("\n") == 1, err


# ---- prompts longer than the model's positions ---------------------------------------------------------


def test_prompt_longer_than_the_positions_is_refused_with_the_lengths(monkeypatch):
    import numpy as np
    from PIL import Image

    from healthgpt import HealthGPT
    from healthgpt.model.healthgpt import PromptTooLong

    torch.manual_seed(0)
    model = HealthGPT("tiny").eval()
    limit = model.llm.config.max_position_embeddings
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    long_text = "the scan shows " * limit
    with pytest.raises(PromptTooLong, match=rf"tokens \({model.num_image_tokens} of them image positions\).* {limit} positions"):
        model.answer(image, long_text, max_new_tokens=4)
    # generation needs room for the whole image's codes: a prompt that leaves less is refused too
    text_len = len(model._prompt_ids(False, "MRI", "gen"))
    words = limit - model.num_image_codes - text_len + 2  # each "x " is at least one token
    with pytest.raises(PromptTooLong, match=rf"needs {model.num_image_codes + 1} more"):
        model.generate_image(None, "MRI " + "x " * words)
    # a prompt that fits but leaves less room than max_new_tokens: the answer is cut, with a warning
    base_len = len(model._prompt_ids(False, "Q", "comp"))
    near = "Q" + " x" * (limit - base_len - 3)
    room = limit - len(model._prompt_ids(False, near, "comp"))
    assert 0 < room < 50
    with pytest.warns(UserWarning, match=rf"answers are cut at {room} tokens"):
        ids = model.generate([None], [near], "comp", max_new_tokens=50)
    assert len(ids[0]) <= room
    # the CLI reports it as one line
    monkeypatch.setattr(cli, "model_from_args", lambda args: model)
    import healthgpt.cli.infer as infer

    monkeypatch.setattr(infer, "model_from_args", lambda args: model)
    assert main(["answer", "--question", long_text[:20000], "--max-new-tokens", "2"]) == 2
