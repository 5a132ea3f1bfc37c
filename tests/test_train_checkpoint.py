"""A kill in the middle of a checkpoint save leaves the previous checkpoint whole, loadable and resumable."""

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from healthgpt.model.config import TINY_VQ
from healthgpt.training.run import TrainArguments, train_stage
from healthgpt.training.trainer import STAGING_PREFIX, TRAINABLE_FILE, AtomicCheckpoints, HealthGPTTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on a shared CPU

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = {"image_tokenizer_config": dict(TINY_VQ, resolution=32)}

WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from healthgpt.model.config import TINY_VQ
    from healthgpt.training.run import TrainArguments, train_stage

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
    train_stage(TrainArguments(stage=3, task="mixed", data=data, output=out, preset="tiny", max_steps=6,
                               global_batch_size=4, per_device_batch_size=4, save_steps=2, logging_steps=1,
                               cache_dir=cache, seed=0),
                model_overrides={"image_tokenizer_config": dict(TINY_VQ, resolution=32)}, quiet=True)
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
    res = train_stage(TrainArguments(stage=3, task="mixed", data=env["data"], output=str(out), preset="tiny",
                                     max_steps=6, global_batch_size=4, per_device_batch_size=4, save_steps=2,
                                     logging_steps=1, cache_dir=env["cache"], seed=0, resume="auto"),
                      model_overrides=MICRO, quiet=True)
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
        train_stage(TrainArguments(stage=1, task="comp", data=env["data"], output=str(out), preset="tiny", max_steps=4,
                                   global_batch_size=4, per_device_batch_size=4, save_steps=2, cache_dir=env["cache"],
                                   seed=0),
                    model_overrides=MICRO, quiet=True)
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2") and not (out / "checkpoint-4").exists()


# ---- the transformers contract the trainer relies on -------------------------------------------------
# These fail loudly on a transformers version whose Trainer no longer behaves as AtomicCheckpoints,
# save_model and _load_from_checkpoint assume.


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=6):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 97, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _SeesTheSave(TrainerCallback):
    """Placed before AtomicCheckpoints: at on_save it sees the checkpoint while it is still staged."""

    def __init__(self, run_dir):
        self.run_dir, self.seen = run_dir, []

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        staged = os.path.join(args.output_dir, name)
        files = set(os.listdir(staged)) if os.path.isdir(staged) else set()
        saved_step = json.load(open(os.path.join(staged, "trainer_state.json")))["global_step"] if files else None
        self.seen.append((state.global_step, os.path.basename(args.output_dir), files, saved_step,
                          os.path.exists(os.path.join(self.run_dir, name))))


def _plain_trainer(tiny_model, run_dir, callbacks, **overrides):
    args = TrainingArguments(output_dir=str(run_dir), per_device_train_batch_size=2, max_steps=4, save_steps=2,
                             save_strategy="steps", logging_steps=1, report_to="none", use_cpu=True,
                             disable_tqdm=True, **overrides)
    return Trainer(model=tiny_model("phi3").train(), args=args, train_dataset=_Rows(), callbacks=callbacks)


def test_trainer_saves_whole_checkpoints_into_output_dir_before_on_save(tiny_model, tmp_path):
    run = tmp_path / "run"
    seen = _SeesTheSave(str(run))
    trainer = _plain_trainer(tiny_model, run, [seen, AtomicCheckpoints()], save_total_limit=1)
    trainer.train()
    # the Trainer wrote each checkpoint, complete, under the args.output_dir AtomicCheckpoints set at step end,
    # and called on_save only then; the final folder did not exist until AtomicCheckpoints renamed it
    assert [(step, where, saved, final) for step, where, _, saved, final in seen.seen] == [
        (2, f"{STAGING_PREFIX}checkpoint-2", 2, False), (4, f"{STAGING_PREFIX}checkpoint-4", 4, False)]
    for *_, files, _, _ in seen.seen:
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    # renamed into place, output_dir restored, no staging left, save_total_limit applied to the real folder
    assert trainer.args.output_dir == str(run)
    assert sorted(os.listdir(run)) == ["checkpoint-4"]
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-4")
    assert json.load(open(run / "checkpoint-4" / "trainer_state.json"))["global_step"] == 4


class _LateSave(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            control.should_save = True


class _ForgetsOutputDir(TrainerCallback):
    """Stands in for a Trainer that saves to the folder it was created with, not args.output_dir."""

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def on_step_end(self, args, state, control, **kwargs):
        args.output_dir = self.run_dir


def test_unstaged_or_misplaced_saves_fail_loudly(tiny_model, tmp_path):
    with pytest.raises(RuntimeError, match="without AtomicCheckpoints staging it"):
        _plain_trainer(tiny_model, tmp_path / "a", [AtomicCheckpoints(), _LateSave()]).train()
    with pytest.raises(RuntimeError, match="did not write checkpoint-2 into args.output_dir"):
        _plain_trainer(tiny_model, tmp_path / "b", [AtomicCheckpoints(), _ForgetsOutputDir(str(tmp_path / "b"))]).train()


def test_private_trainer_api_used_is_still_there(tiny_model, tmp_path):
    # the only private Trainer methods HealthGPTTrainer overrides (itself or through HLoRATrainerMixin), with the signatures it assumes
    own = HealthGPTTrainer.__mro__[:HealthGPTTrainer.__mro__.index(Trainer)]
    overridden = sorted({n for c in own for n in vars(c) if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)})
    assert overridden == ["_defer_fsdp_gradient_reduction", "_load_best_model", "_load_from_checkpoint",
                          "_load_optimizer_and_scheduler"]
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint", "model"]
    # a sharded run's (tests/test_train_fsdp.py runs them): the ones overridden and the one called
    assert list(inspect.signature(Trainer._load_optimizer_and_scheduler).parameters) == ["self", "checkpoint"]
    assert list(inspect.signature(Trainer._defer_fsdp_gradient_reduction).parameters) == ["self"]
    assert list(inspect.signature(Trainer._save_rng_state).parameters) == ["self", "output_dir"]
    assert list(inspect.signature(Trainer.save_model).parameters) == ["self", "output_dir", "_internal_call"]
    # the label-shift flag HealthGPTTrainer sets is the one this Trainer computes (True for a causal LM)
    assert _plain_trainer(tiny_model, tmp_path / "c", [])._loss_shifts_labels is True
    # resuming calls _load_from_checkpoint(path) before training
    calls = []

    class Spy(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            calls.append(resume_from_checkpoint)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    first = _plain_trainer(tiny_model, tmp_path / "d", [])
    first.train()
    again = Spy(model=first.model, args=first.args, train_dataset=_Rows())
    again.train(resume_from_checkpoint=str(tmp_path / "d" / "checkpoint-2"))
    assert calls == [str(tmp_path / "d" / "checkpoint-2")] and again.state.global_step == 4
