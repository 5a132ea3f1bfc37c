"""Resuming continues the same run: N steps straight == N/2, stop, resume, N/2 more."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from healthgpt.model.config import TINY_VQ, HealthGPTConfig
from healthgpt.training.run import TrainArguments, train_stage
from healthgpt.training.trainer import TRAINABLE_FILE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on a shared CPU

MICRO = {"image_tokenizer_config": dict(TINY_VQ, resolution=32)}


class StopAfterSave(TrainerCallback):
    """Ends the run right after the checkpoint of ``step`` is written (as a crash would, but cleanly)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def env(training_subset):
    from healthgpt.model.healthgpt import HealthGPT

    subset = training_subset(6)
    torch.manual_seed(0)
    return {**subset, "model": HealthGPT(HealthGPTConfig.preset("tiny", **MICRO))}


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_equals_straight_run(env, tmp_path):
    # stage 3 mixed: both plugins with dropout 0.05 (RNG state matters), warm-up + cosine schedule
    # (scheduler state matters), batch 4 = 2 x 2 accumulation, shuffled data (sampler state matters)
    kw = dict(stage=3, task="mixed", data=env["data"], preset="tiny", max_steps=6, global_batch_size=4,
              per_device_batch_size=2, save_steps=3, logging_steps=1, cache_dir=env["cache"], seed=3)
    straight = copy.deepcopy(env["model"])
    train_stage(TrainArguments(output=str(tmp_path / "a"), **kw), model=straight, save_final=False, quiet=True)

    first = copy.deepcopy(env["model"])
    train_stage(TrainArguments(output=str(tmp_path / "b"), **kw), model=first, save_final=False, quiet=True,
                callbacks=[StopAfterSave(3)])
    ckpt = tmp_path / "b" / "checkpoint-3"
    assert ckpt.is_dir() and not (tmp_path / "b" / "checkpoint-6").exists()
    saved = load_file(str(ckpt / TRAINABLE_FILE))
    assert set(saved) == set(_trainable(first))  # only the trainable tensors are checkpointed
    resumed = copy.deepcopy(env["model"])  # a fresh process would rebuild the same starting model
    res = train_stage(TrainArguments(output=str(tmp_path / "b"), resume="auto", **kw), model=resumed, quiet=True)
    assert res.steps == 6 and res.summary["resumed_from"].endswith("checkpoint-3")

    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs from the straight run by {worst}"
    moved = max((a[k] - env["model"].state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the runs did train

    # the loss log continues the same run: steps 1..6 once each, the resumed part equal to the straight run's
    log = [json.loads(line) for line in open(tmp_path / "b" / "loss_log.jsonl")]
    straight_log = [json.loads(line) for line in open(tmp_path / "a" / "loss_log.jsonl")]
    assert [r["step"] for r in log] == [r["step"] for r in straight_log] == [1, 2, 3, 4, 5, 6]
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(log, straight_log))
    stage = json.load(open(tmp_path / "b" / "stage.json"))
    assert stage["complete"] and stage["steps"] == 6
    assert os.path.isfile(tmp_path / "b" / "loss_curve.png")
