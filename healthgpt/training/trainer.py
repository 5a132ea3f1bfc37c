"""``HealthGPTTrainer``: transformers' ``Trainer`` with what HealthGPT's stages need.

- **Learning rates per parameter group** (``create_optimizer``): the projector and the rest
  (plugins, fusion layer) at their own rates; the scheduler scales every group alike.
- **Atomic checkpoints** (``AtomicCheckpoints``, a ``TrainerCallback`` the trainer adds last):
  ``checkpoint-N`` is written as ``.staging-checkpoint-N/checkpoint-N`` and renamed into place
  once complete, so a crash or a kill mid-save leaves the previous checkpoints untouched and never
  a half-written ``checkpoint-N`` (``get_last_checkpoint`` only sees complete ones). Leftover
  staging folders are removed on the next start.
- **Small checkpoints**: hlora's Trainer mechanism (``hlora.integrations.transformers.HLoRATrainerMixin``:
  ``save_model``, resume and ``load_best_model_at_end`` through one hook pair) with HealthGPT's
  trainable state: without DeepSpeed/FSDP a checkpoint holds only the trainable tensors
  (``trainable.safetensors``: plugins, projector, fusion layer) plus optimizer, scheduler, RNG and
  trainer state; the frozen weights are the run's starting point, rebuilt on resume. DeepSpeed
  checkpoints are its own.
- **FSDP2-sharded models** (``--fsdp``: ``healthgpt.training.fsdp`` shards the model before the
  Trainer sees it, and flags it ``is_distributed_loading_by_transformers``, the Trainer's contract for
  a model that owns its sharding: no DDP wrap, ``save_only_model``). Their checkpoints are the
  engine's: ``checkpoint-N/fsdp/`` (``fsdp.save_sharded``: each rank's shards of the trainable
  parameters and of the optimizer state) plus the scheduler, every rank's RNG state and the trainer
  state; resume reads them back once the optimizer exists (``_load_optimizer_and_scheduler``).
- ``tests/test_train_checkpoint.py`` and ``tests/test_hlora_trainer.py`` check that transformers
  still calls the private methods relied on (tests/test_train_fsdp.py runs the sharded ones).
- **Per-task losses** (``compute_loss``/``log``): mixed batches also log ``loss_comp`` and
  ``loss_gen`` (mean token cross-entropy of each task's samples since the last log).

``LossLogCallback`` writes ``loss_log.jsonl`` as training goes and ``loss_curve.png`` at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from hlora import copy_checked
from hlora.files import atomic_write
from hlora.integrations.transformers import HLoRATrainerMixin

from healthgpt.constants import TASKS as _TASKS
from healthgpt.training import fsdp

__all__ = ["HealthGPTTrainer", "AtomicCheckpoints", "LossLogCallback", "TRAINABLE_FILE", "SHARDED_DIR", "STAGING_PREFIX",
           "plot_losses", "read_loss_log", "clean_staging"]

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
SHARDED_DIR = "fsdp"  # in checkpoint-N of a sharded run: fsdp.save_sharded's folder
STAGING_PREFIX = ".staging-"
LOSS_LOG = "loss_log.jsonl"
LOSS_PNG = "loss_curve.png"


def clean_staging(run_dir: str) -> list:
    """Remove staging folders a killed save left behind in ``run_dir``; -> removed names."""
    removed = []
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            try:
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _barrier(args) -> None:
    if args.world_size > 1:
        args.distributed_state.wait_for_everyone()


class AtomicCheckpoints(TrainerCallback):
    """Every ``checkpoint-N`` the Trainer saves appears whole or not at all.

    Through public hooks only: when a step (or epoch) ends with ``control.should_save`` set, the
    Trainer saves next, into ``args.output_dir/checkpoint-N``; this callback first points
    ``args.output_dir`` at ``<run>/.staging-checkpoint-N``. ``on_save`` (the Trainer calls it once
    the checkpoint is complete) points it back, fsyncs the files, renames the folder to
    ``<run>/checkpoint-N`` and applies ``save_total_limit`` to ``<run>``. A save that fails or is
    killed leaves only the staging folder (``clean_staging`` removes it on the next start).

    It must come after every callback that sets ``should_save`` (``HealthGPTTrainer`` adds it
    last). A save it did not stage (``save_strategy="best"``, decided after evaluation) or one the
    Trainer wrote elsewhere is an error, not a silent non-atomic checkpoint.
    """

    def __init__(self):
        self.staged = None  # (the real output_dir, the staging folder) while a save is staged

    def on_train_begin(self, args, state, control, **kwargs):
        if self.staged is not None:  # an earlier train() died mid-save: undo its redirect
            args.output_dir, self.staged = self.staged[0], None

    def on_step_end(self, args, state, control, **kwargs):
        self._stage(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._stage(args, state, control)

    def _stage(self, args, state, control) -> None:
        if not control.should_save or self.staged is not None:
            return
        run_dir = args.output_dir
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        _barrier(args)  # no process writes into the staging folder before it exists afresh
        self.staged = (run_dir, staging)
        args.output_dir = staging

    def on_save(self, args, state, control, **kwargs):
        if self.staged is None:
            raise RuntimeError(f"the Trainer saved checkpoint step {state.global_step} without AtomicCheckpoints staging it "
                               "(a callback after it set should_save, or save_strategy='best'): it may be half-written")
        (run_dir, staging), self.staged = self.staged, None
        args.output_dir = run_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        written, final = os.path.join(staging, name), os.path.join(run_dir, name)
        _barrier(args)  # every process has written its part (RNG states, shards)
        if args.should_save:
            if not os.path.isdir(written):
                raise RuntimeError(f"the Trainer did not write {name} into args.output_dir ({staging}): this transformers "
                                   f"version saves checkpoints elsewhere, so they cannot be made atomic (and {name} "
                                   f"may be half-written)")
            _fsync_tree(written)
            if os.path.isdir(final):  # the same step saved again (a resumed run): swap it out
                old = os.path.join(run_dir, f"{STAGING_PREFIX}old-{name}")
                os.replace(final, old)
                os.replace(written, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(written, final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(run_dir)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=False)
        _barrier(args)


class HealthGPTTrainer(HLoRATrainerMixin, Trainer):
    """``Trainer`` for one HealthGPT stage (module docstring).

    Args (besides ``Trainer``'s): ``param_groups``: ``[{"name", "lr", "params": [Parameter]}]``
    (``healthgpt.training.stages.apply_stage`` makes them); ``track_task_losses``: log per-task losses.
    """

    def __init__(self, *args, param_groups: list, track_task_losses: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.param_groups = param_groups
        self.track_task_losses = track_task_losses
        self._task_loss = {t: [0.0, 0] for t in _TASKS}  # task -> [sum of token losses, tokens]
        # HealthGPT's forward takes **kwargs and hands num_items_in_batch to the LLM's loss (a token
        # sum divided by the global count), so batches of unequal lengths and several processes
        # weigh every supervised token alike. The LLM shifts labels: count labels[..., 1:].
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.add_callback(AtomicCheckpoints())  # last: after every callback that may set should_save

    # ---- optimizer ------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """One optimizer group per ``param_groups`` entry, at its learning rate; every trainable
        parameter of the model must be in exactly one (the scheduler scales every group alike)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        names = {id(p): n for n, p in opt_model.named_parameters()}
        groups, seen = [], set()
        for g in self.param_groups:
            foreign = [p for p in g["params"] if id(p) not in names]
            if foreign:
                raise RuntimeError(f"parameter group {g['name']!r} holds {len(foreign)} tensor(s) that are not parameters of "
                                   f"the model being optimised (was it wrapped after the groups were made?)")
            ps = [p for p in g["params"] if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in ps)
            if ps:
                groups.append({"params": ps, "lr": float(g["lr"]), "weight_decay": self.args.weight_decay, "name": g["name"]})
        stray = [n for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in seen]
        if stray:
            raise RuntimeError(f"trainable parameters in no group (they would not be trained): {stray[:5]}")
        if not groups:
            raise RuntimeError("nothing to train: every parameter group is empty")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model", "lr")}
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # ---- loss -------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss; while training the model computes logits only where the loss needs them
        (``return_logits=False``: evaluation keeps every position's) and its per-sample token loss sums
        feed the per-task losses."""
        tasks = inputs.get("tasks")
        if model.training and "labels" in inputs:
            inputs = {**inputs, "return_logits": False}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.track_task_losses and model.training and tasks is not None and isinstance(outputs, dict) \
                and outputs.get("token_loss_sum") is not None:
            self._track(outputs["token_loss_sum"], outputs["token_count"], tasks)
        return (loss, outputs) if return_outputs else loss

    def _track(self, loss_sums: torch.Tensor, counts: torch.Tensor, tasks) -> None:
        """Add each sample's token cross-entropy sum and token count ([B] each) to its task's tally."""
        for t, total, n in zip(tasks, loss_sums.tolist(), counts.tolist()):
            if t in self._task_loss and n:
                self._task_loss[t][0] += total
                self._task_loss[t][1] += n

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs and self.track_task_losses:
            stats = torch.tensor([v for t in _TASKS for v in self._task_loss[t]], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized() and self.args.world_size > 1:
                stats = stats.to(self.args.device)
                torch.distributed.all_reduce(stats)
                stats = stats.cpu()
            for i, t in enumerate(_TASKS):
                total, count = float(stats[2 * i]), float(stats[2 * i + 1])
                if count:
                    logs[f"loss_{t}"] = total / count
            self._task_loss = {t: [0.0, 0] for t in _TASKS}
        if "loss" in logs and self.optimizer is not None and len(self.optimizer.param_groups) > 1:
            for g in self.optimizer.param_groups:
                logs[f"lr/{g.get('name', '?')}"] = g["lr"]
        super().log(logs, start_time)

    # ---- checkpoints ----------------------------------------------------------------------------

    # The hook pair of HLoRATrainerMixin (which calls it from save_model, resume and best-model
    # loading): HealthGPT trains more than the plugins, so its checkpoints hold every trainable tensor.
    # (``HealthGPT.save_pretrained`` writes the whole model.)

    def save_trainable_state(self, output_dir: str) -> None:
        trainable = {n: p.detach().contiguous().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})

    def load_trainable_state(self, checkpoint_dir: str, model=None) -> None:
        model = self.model if model is None else model
        tensors = load_file(os.path.join(checkpoint_dir, TRAINABLE_FILE))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        copy_checked(params, tensors, what=f"checkpoint {checkpoint_dir} into this run's trainable parameters "
                                           f"(resume with the same --stage/--task and model as the run that wrote it)")


    # A model sharded by healthgpt.training.fsdp: the engine's sharded checkpoint (every rank writes its
    # shards) instead of the trainable tensors, and the optimizer state with it. Private Trainer methods
    # overridden (no public hook): _load_from_checkpoint (above, via the mixin), _load_optimizer_and_scheduler,
    # _defer_fsdp_gradient_reduction; _save_rng_state is called. tests/test_train_fsdp.py runs them all.

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Unsharded: the mixin's (trainable tensors). Sharded: ``output_dir/fsdp`` (trainable
        parameters and optimizer state, each rank its shards), the scheduler, every rank's RNG state
        and the training arguments. Collective for a sharded model: every rank calls it (the Trainer
        does for checkpoints). The full model is ``fsdp.gather_state_dict``'s (``healthgpt train``'s final save)."""
        if not fsdp.is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        if self.optimizer is None:
            raise RuntimeError("a sharded run's checkpoint holds its optimizer state: save it once training has started "
                               "(the gathered weights: healthgpt.training.fsdp.gather_state_dict)")
        output_dir = self.args.output_dir if output_dir is None else output_dir
        fsdp.save_sharded(self.model, self.optimizer, os.path.join(output_dir, SHARDED_DIR))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        self._save_rng_state(output_dir)

    def holds_trainable_state(self, checkpoint_dir: str) -> bool:
        if fsdp.is_sharded(self.model):
            return os.path.isdir(os.path.join(checkpoint_dir, SHARDED_DIR))
        return os.path.isfile(os.path.join(checkpoint_dir, TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        if not fsdp.is_sharded(self.model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.holds_trainable_state(resume_from_checkpoint):  # the weights come with the optimizer state, below
            raise RuntimeError(f"{resume_from_checkpoint} has no sharded state ({SHARDED_DIR}/): it was not written by an "
                               f"--fsdp run; resume with the engine that wrote it")

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None or not fsdp.is_sharded(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        fsdp.load_sharded(self.model, self.optimizer, os.path.join(checkpoint, SHARDED_DIR))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """Gradient accumulation on a sharded model: reduce-scatter every micro-batch into the fp32
        sharded gradients (no deferral). FSDP2's deferred reduction (``set_requires_gradient_sync(False)``)
        keeps unsharded gradients, upcast to the reduce dtype once accumulated; under bf16 a plugin
        unused by an earlier micro-batch of the window (all its samples of the other task) then brings
        a bf16 gradient next to fp32 ones, and torch 2.13's ``foreach_reduce`` refuses the mix ("expects
        uniform gradient dtype"). The Trainer's own version also reads a transformers ``DistributedConfig``."""
        yield


# ---- loss log and curve -----------------------------------------------------------------------------


def read_loss_log(path: str) -> list:
    if os.path.isdir(path):
        path = os.path.join(path, LOSS_LOG)
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    return rows


def plot_losses(rows: list, path: str, title: str = "") -> str | None:
    """Loss (and per-task losses) against the step -> a PNG at ``path``; None without rows."""
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for key, style in (("loss", "-"), ("loss_comp", "--"), ("loss_gen", ":")):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3,
                    label={"loss": "loss", "loss_comp": "comp (text)", "loss_gen": "gen (image tokens)"}[key])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


class LossLogCallback(TrainerCallback):
    """``loss_log.jsonl`` (one JSON object per logging step) and, at the end, ``loss_curve.png``."""

    def __init__(self, output_dir: str, title: str = ""):
        self.output_dir = output_dir
        self.title = title

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, LOSS_LOG)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a resumed run: the log restarts from the checkpoint's history
            os.makedirs(self.output_dir, exist_ok=True)
            with open(self.path, "w") as f:
                for row in state.log_history:
                    if "loss" in row:
                        f.write(json.dumps(row) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            try:
                plot_losses(read_loss_log(self.path), os.path.join(self.output_dir, LOSS_PNG), self.title)
            except Exception as e:  # a plot must never fail a finished run
                logger.warning(f"could not draw the loss curve: {e}")
