"""Issue 12, training runs: nothing overwritten unasked, counts that are exact, resume past damage.

One tiny 2-step run (the tiny preset, micro image tokenizer) serves every test of this module.
"""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from hlora import CheckpointError
from healthgpt.model.config import TINY_VQ, HealthGPTConfig
from healthgpt.model.weights import SAVING_DIR
from healthgpt.training.run import STAGE_FILE, TrainArguments, TrainError, prepare_output, train_stage
from healthgpt.training.trainer import TRAINABLE_FILE, read_loss_log

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = {"image_tokenizer_config": dict(TINY_VQ, resolution=32)}


def _args(env, output, **kw):
    base = dict(stage=3, task="comp", data=env["data"], preset="tiny", max_steps=2, global_batch_size=2,
                per_device_batch_size=2, save_steps=1, logging_steps=1, cache_dir=env["cache"], seed=1)
    return TrainArguments(output=str(output), **{**base, **kw})


@pytest.fixture(scope="module")
def run(training_subset, tmp_path_factory):
    """A folder holding a saved model, trained over with --overwrite for 2 steps (checkpoints 1 and 2)."""
    from healthgpt.model.healthgpt import HealthGPT

    env = training_subset(2)
    torch.manual_seed(0)
    model = HealthGPT(HealthGPTConfig.preset("tiny", **MICRO))
    out = tmp_path_factory.mktemp("run") / "out"
    model.save_pretrained(out)
    before = load_file(str(out / "projectors.safetensors"))
    with pytest.raises(TrainError, match="already holds a saved model.*--overwrite"):
        train_stage(_args(env, out), model=model, quiet=True)
    assert all(torch.equal(load_file(str(out / "projectors.safetensors"))[k], v) for k, v in before.items())
    result = train_stage(_args(env, out, overwrite=True), model=model, quiet=True)
    return {"env": env, "out": out, "result": result, "before": before}


def test_output_holding_a_saved_model_is_replaced_only_with_overwrite(run):
    after = load_file(str(run["out"] / "projectors.safetensors"))
    assert any(not torch.equal(after[k], v) for k, v in run["before"].items())  # the trained comp projector
    assert not (run["out"] / SAVING_DIR).exists()


def test_stage_json_counts_exactly_the_steps_run(run):
    summary = json.loads((run["out"] / STAGE_FILE).read_text())
    assert summary["complete"] and summary["steps"] == 2 == run["result"].steps
    assert [r["step"] for r in read_loss_log(str(run["out"])) if "loss" in r] == [1, 2]
    assert sorted(n for n in os.listdir(run["out"]) if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]


def test_resume_skips_a_damaged_latest_checkpoint_with_a_warning_and_cleans_temporary_files(run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run["out"], out)
    weights = out / "checkpoint-2" / TRAINABLE_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # a damaged disk / partial copy
    (out / ".tmp-abc-stage.json").write_text("{")  # an atomic write a kill interrupted
    (out / ".staging-checkpoint-3").mkdir()
    args = _args(run["env"], out, resume="auto")
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint checkpoint-2 .*trainable\.safetensors"):
        output, resume_from = prepare_output(args, True, lambda *a: None)
    assert resume_from == str(out / "checkpoint-1")
    assert not (out / ".tmp-abc-stage.json").exists() and not (out / ".staging-checkpoint-3").exists()
    (out / "checkpoint-1" / "trainer_state.json").write_text("")
    with pytest.warns(UserWarning), pytest.raises(TrainError, match="no complete checkpoint"):
        prepare_output(args, True, lambda *a: None)


def test_killed_run_folder_as_init_says_it_is_unfinished_and_how_to_resume(run, tmp_path):
    import shutil

    killed = tmp_path / "killed"
    shutil.copytree(run["out"], killed)
    os.remove(killed / STAGE_FILE)  # a run killed before its end leaves no stage.json
    with pytest.raises(CheckpointError, match="unfinished training run.*--resume"):
        train_stage(_args(run["env"], tmp_path / "next", init=str(killed)), quiet=True)


def test_output_equal_to_init_is_refused(run):
    with pytest.raises(TrainError, match="is the --init model itself"):
        _args(run["env"], str(run["out"]) + "/", init=str(run["out"]), overwrite=True)


def test_training_a_model_with_a_merged_plugin_is_refused_and_leaves_it_unchanged(run, tmp_path):
    import hlora
    from healthgpt.model.config import _plugins
    from healthgpt.model.healthgpt import HealthGPT

    torch.manual_seed(0)
    model = HealthGPT(HealthGPTConfig.preset("tiny", plugins=_plugins(4, 4, experts=1), **MICRO))
    hlora.merge(model.llm, "comp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainError, match="merged into the model's base weights.*unmerge"):
        train_stage(_args(run["env"], tmp_path / "o"), model=model, quiet=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
