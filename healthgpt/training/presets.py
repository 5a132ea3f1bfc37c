"""Per-stage hyperparameters: the paper's Table 7 for HealthGPT-M3 and -L14, and a CPU ``tiny`` set.

Table 7 columns are stage 1 comp, stage 1 gen, stage 2, stage 3 comp, stage 3 gen. Its "Adapter
LR" is the projector's learning rate (LLaVA calls the projector the "mm adapter"; stage 1 comp
trains only the projector, at 1e-3, and its "Learning Rate" is "/"); "Learning Rate" is the rate
of everything else trained in that stage (H-LoRA plugins, stage 2's embeddings + lm_head).

M3 (all five columns given)::

                     1 comp   1 gen   2       3 comp   3 gen
    projector lr     1e-3     2e-5    2e-5    2e-5     2e-5
    lr               -        2e-4    2e-4    2e-4     2e-4
    global batch     256      64      32      128      64
    dropout          0        0.05    0.05    0.05     0.05
    schedule         warm-up  warm-up constant warm-up warm-up

L14: the published row gives four projector-lr, learning-rate and dropout values for five columns;
read left to right they are stage 1 comp (1e-3, -, 0), stage 1 gen (2e-5, 1e-4, 0.05), stage 2
(2e-5, 2e-4, 0.05) and stage 3 (2e-5, 2e-4, 0.05, both tasks). Batches as M3.

Common: AdamW, weight decay 0, max length 2048. "Warm up" is LLaVA's recipe: linear warm-up over
the first 3% of steps, then cosine decay; stage 2 is constant. Epochs are not in the table: 1.

``mixed`` in stages 1 and 3 (both tasks in one run, each sample routed to its own plugin and
projector) keeps each task's learning rates and dropout (they are per parameter group / per
plugin) and takes the smaller global batch of the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["StageHParams", "STAGE_HPARAMS", "get_hparams", "stage_keys"]


@dataclass(frozen=True)
class StageHParams:
    projector_lr: float | None  # Table 7 "Adapter LR"; None: the stage trains no projector
    lr: float | None  # Table 7 "Learning Rate": plugins / embeddings + lm_head; None: nothing else trained
    global_batch_size: int
    dropout: float  # H-LoRA dropout (rank space) of the plugins during this stage
    scheduler: str  # "cosine" (with warm-up) or "constant"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048
    epochs: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def _table(rows: dict, batches=(256, 64, 32, 128, 64), warmup: float = 0.03, max_length: int = 2048) -> dict:
    keys = [(1, "comp"), (1, "gen"), (2, "mixed"), (3, "comp"), (3, "gen")]
    out = {}
    for i, key in enumerate(keys):
        out[key] = StageHParams(
            projector_lr=rows["projector_lr"][i], lr=rows["lr"][i], global_batch_size=batches[i],
            dropout=rows["dropout"][i], scheduler="constant" if key[0] == 2 else "cosine",
            warmup_ratio=0.0 if key[0] == 2 else warmup, max_length=max_length,
        )
    return out


STAGE_HPARAMS = {
    "m3": _table({
        "projector_lr": (1e-3, 2e-5, 2e-5, 2e-5, 2e-5),
        "lr": (None, 2e-4, 2e-4, 2e-4, 2e-4),
        "dropout": (0.0, 0.05, 0.05, 0.05, 0.05),
    }),
    "l14": _table({
        "projector_lr": (1e-3, 2e-5, 2e-5, 2e-5, 2e-5),
        "lr": (None, 1e-4, 2e-4, 2e-4, 2e-4),
        "dropout": (0.0, 0.05, 0.05, 0.05, 0.05),
    }),
    # CPU demo / tests: a few dozen steps on a random tiny model, so rates are high and batches small.
    "tiny": _table({
        "projector_lr": (1e-2, 1e-2, 5e-3, 5e-3, 5e-3),
        "lr": (None, 1e-2, 5e-3, 5e-3, 5e-3),
        "dropout": (0.0, 0.05, 0.05, 0.05, 0.05),
    }, batches=(4, 4, 4, 4, 4), warmup=0.1),
}
"""Training hyperparameter presets (``--preset``): name -> (stage, task) -> ``StageHParams``. The model
architectures of the same names are ``healthgpt.model.config.MODEL_PRESETS``. Tasks ``comp``/``gen`` in stages 1 and 3, ``mixed`` in 2."""


def stage_keys(stage: int, task: str) -> list:
    """The table columns a run uses: its own, or both tasks' for ``mixed`` in stages 1 and 3."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if task not in ("comp", "gen", "mixed"):
        raise ValueError(f"task must be comp, gen or mixed, got {task!r}")
    if stage == 2:
        if task != "mixed":
            raise ValueError("stage 2 trains the shared fusion layer (embeddings + lm_head) on mixed data: use --task mixed")
        return [(2, "mixed")]
    return [(stage, "comp"), (stage, "gen")] if task == "mixed" else [(stage, task)]


def get_hparams(preset: str, stage: int, task: str, **overrides) -> dict:
    """``{task_or_mixed: StageHParams}`` for the run: one entry per table column it uses, each with
    ``overrides`` (fields of ``StageHParams`` that are not None) applied."""
    if preset not in STAGE_HPARAMS:
        raise ValueError(f"unknown training preset {preset!r}; presets: {sorted(STAGE_HPARAMS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(StageHParams.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)}")
    return {t: replace(STAGE_HPARAMS[preset][(s, t)], **overrides) for s, t in stage_keys(stage, task)}
