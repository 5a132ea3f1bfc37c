"""A kill in the middle of a checkpoint save leaves the previous checkpoint whole, loadable and resumable."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from healthgpt.model.config import TINY_VQ
from healthgpt.training.run import train_stage
from healthgpt.training.trainer import STAGING_PREFIX, TRAINABLE_FILE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on a shared CPU

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = {"image_tokenizer_config": dict(TINY_VQ, resolution=32)}

WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from healthgpt.model.config import TINY_VQ
    from healthgpt.training.run import train_stage

    out, data, cache = sys.argv[1:4]
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        # checkpoint-4: the model tensors are written, the optimizer file is half-written, then SIGKILL
        if isinstance(f, str) and "checkpoint-4" in f and f.endswith("optimizer.pt"):
            with open(f, "wb") as fh:
                fh.write(b"half an optimizer state")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save_then_die
    train_stage(stage=3, task="mixed", data=data, output=out, preset="tiny",
                model_overrides={"image_tokenizer_config": dict(TINY_VQ, resolution=32)},
                max_steps=6, global_batch_size=4, per_device_batch_size=4, save_steps=2, logging_steps=1,
                cache_dir=cache, quiet=True, seed=0)
""")


@pytest.fixture(scope="module")
def env(training_subset):
    return training_subset(4)


def test_sigkill_mid_save_keeps_previous_checkpoint(env, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    envvars = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(out), env["data"], env["cache"]], cwd=REPO, env=envvars,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    # the half-written save never became checkpoint-4: only its staging folder is left
    assert not (out / "checkpoint-4").exists()
    assert (out / f"{STAGING_PREFIX}checkpoint-4").is_dir()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    prev = out / "checkpoint-2"
    state = json.load(open(prev / "trainer_state.json"))
    assert state["global_step"] == 2
    tensors = load_file(str(prev / TRAINABLE_FILE))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    torch.load(prev / "optimizer.pt", weights_only=True)  # whole

    # resuming (a fresh model built the same way) continues from checkpoint-2 and finishes the run
    res = train_stage(stage=3, task="mixed", data=env["data"], output=str(out), preset="tiny", model_overrides=MICRO,
                      max_steps=6, global_batch_size=4, per_device_batch_size=4, save_steps=2, logging_steps=1,
                      cache_dir=env["cache"], quiet=True, seed=0, resume=True)
    assert res.steps == 6 and res.summary["resumed_from"] == str(prev)
    assert not any(name.startswith(STAGING_PREFIX) for name in os.listdir(out))
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-6"} <= set(os.listdir(out))
    assert [r["step"] for r in res.losses] == [1, 2, 3, 4, 5, 6]


def test_failed_save_in_process_keeps_previous_checkpoint(env, tmp_path, monkeypatch):
    from transformers import Trainer

    calls = {"n": 0}
    real = Trainer._save_optimizer_and_scheduler

    def flaky(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", flaky)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        train_stage(stage=1, task="comp", data=env["data"], output=str(out), preset="tiny", model_overrides=MICRO,
                    max_steps=4, global_batch_size=4, per_device_batch_size=4, save_steps=2, cache_dir=env["cache"],
                    quiet=True, seed=0)
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2") and not (out / "checkpoint-4").exists()
