"""``TrainArguments``: every option of ``healthgpt train``, one dataclass.

``transformers.HfArgumentParser`` turns the fields into the command line (``--global-batch-size``,
``--bf16``, ``--no-progress``, ...; the ``help`` metadata is the option's help); the Python API
takes the same object: ``train_stage(TrainArguments(stage=3, task="comp", data=..., output=...))``.
Hyperparameters left ``None`` come from the ``--preset`` table (``STAGE_HPARAMS``); the model's
architecture from ``--model-preset`` (``MODEL_PRESETS``).
"""

# No ``from __future__ import annotations``: HfArgumentParser reads the field types at run time.

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from healthgpt.model.config import MODEL_PRESETS
from healthgpt.training.presets import STAGE_HPARAMS

__all__ = ["TrainArguments", "TrainError"]


class TrainError(RuntimeError):
    """A training run that cannot start as asked; the message says why and what to pass."""


def _help(text: str, **argparse_options) -> dict:
    return {"help": text, **argparse_options}


@dataclass
class TrainArguments:
    """One stage of the three-stage recipe (``healthgpt train``); ``None`` means "the preset's"."""

    # ---- the stage --------------------------------------------------------------------------------
    stage: Literal[1, 2, 3] = field(metadata=_help("training stage (paper section 4)"))
    data: str = field(metadata=_help("training file (LLaVA-style JSON/JSONL, see healthgpt.data.format)"))
    output: str = field(metadata=_help("output directory: the trained model, logs and checkpoints"))
    task: Literal["comp", "gen", "mixed"] | None = field(default=None, metadata=_help(
        "comp, gen, or mixed (both tasks, each sample routed to its plugin); default: mixed for stage 2, else required"))
    init: str | None = field(default=None, metadata=_help("start from this model directory (the previous stage's --output)"))
    preset: str | None = field(default=None, metadata=_help(
        "training hyperparameters (STAGE_HPARAMS): Table 7's m3 or l14, or the CPU demo's tiny; "
        "default: the --init run's, else --model-preset, else m3", choices=sorted(STAGE_HPARAMS)))

    # ---- the model (stage 1 without --init) --------------------------------------------------------
    model_preset: str | None = field(default=None, metadata=_help(
        "model architecture (MODEL_PRESETS) for a model built here; default: --preset", choices=sorted(MODEL_PRESETS)))
    llm_path: str | None = field(default=None, metadata=_help("local Phi-3-mini / phi-4 checkpoint directory"))
    vision_path: str | None = field(default=None, metadata=_help("local CLIP ViT-L/14-336 checkpoint directory"))
    tokenizer_path: str | None = field(default=None, metadata=_help("local tokenizer directory (default: the LLM's)"))
    image_tokenizer_path: str | None = field(default=None, metadata=_help("VQGAN directory (healthgpt convert-vqgan)"))
    dtype: Literal["float32", "float16", "bfloat16"] | None = field(default=None, metadata=_help("model weights dtype"))
    load_in_4bit: bool = field(default=False, metadata=_help(
        "QLoRA: the LLM's linears (not lm_head) in bitsandbytes nf4, computing in --dtype (HealthGPTConfig.load_in_4bit)"))

    # ---- hyperparameters (default: the preset's) ---------------------------------------------------
    lr: float | None = field(default=None, metadata=_help("learning rate of plugins / fusion layer"))
    projector_lr: float | None = field(default=None, metadata=_help("learning rate of the projector(s)"))
    global_batch_size: int | None = field(default=None, metadata=_help("samples per optimizer step, over all processes"))
    per_device_batch_size: int | None = field(default=None, metadata=_help("default: min(4, global / processes)"))
    epochs: float | None = field(default=None, metadata=_help("passes over the data"))
    max_steps: int | None = field(default=None, metadata=_help("stop after this many optimizer steps (overrides --epochs)"))
    scheduler: str | None = field(default=None, metadata=_help("cosine (with warm-up), constant, linear, ... (transformers names)"))
    warmup_ratio: float | None = field(default=None, metadata=_help("warm-up as a fraction of the steps"))
    dropout: float | None = field(default=None, metadata=_help("H-LoRA dropout of the plugins"))
    weight_decay: float | None = field(default=None, metadata=_help("AdamW weight decay"))
    max_length: int | None = field(default=None, metadata=_help("token limit per sample (default 2048)"))
    seed: int = field(default=42, metadata=_help("seed of the model init, data order and dropout"))

    # ---- data --------------------------------------------------------------------------------------
    image_folder: str | None = field(default=None, metadata=_help("resolve relative image paths here first"))
    skip_bad: bool = field(default=False, metadata=_help("drop bad rows (counted) instead of stopping at the first"))
    cache_dir: str | None = field(default=None, metadata=_help("VQ-id cache root (default $HEALTHGPT_CACHE or ~/.cache/healthgpt)"))
    num_workers: int = field(default=0, metadata=_help("DataLoader workers"))

    # ---- engine ------------------------------------------------------------------------------------
    bf16: bool = field(default=False, metadata=_help("bf16 mixed precision"))
    fp16: bool = field(default=False, metadata=_help("fp16 mixed precision"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in the backward pass"))
    deepspeed: str | None = field(default=None, metadata=_help("DeepSpeed config JSON (configs/zero2.json, configs/zero3.json)"))
    fsdp: bool = field(default=False, metadata=_help(
        "shard the model with PyTorch FSDP2 over the launched processes (GPUs or CPUs; healthgpt.training.fsdp)"))
    fsdp_config: str | None = field(default=None, metadata=_help("FSDP config JSON (default with --fsdp: configs/fsdp.json)"))
    save_steps: int = field(default=500, metadata=_help("checkpoint every N optimizer steps"))
    save_total_limit: int | None = field(default=None, metadata=_help("keep only the newest N checkpoints"))
    logging_steps: int = field(default=10, metadata=_help("log the loss every N optimizer steps"))
    resume: str | None = field(default=None, metadata=_help(
        "continue from the last complete checkpoint in --output (or from PATH)", nargs="?", const="auto"))
    overwrite: bool = field(default=False, metadata=_help("start over even if --output holds checkpoints of an earlier run"))
    report_to: str = field(default="none", metadata=_help("transformers integrations (tensorboard, wandb...); default none"))
    progress: bool = field(default=True, metadata=_help("progress bars (--no-progress: none)"))
    cpu: bool = field(default=False, metadata=_help("train on the CPU even if a GPU is present"))

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise TrainError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.task is None:
            if self.stage != 2:
                raise TrainError(f"stage {self.stage} needs --task comp, gen or mixed")
            self.task = "mixed"
        if self.task not in ("comp", "gen", "mixed"):
            raise TrainError(f"--task must be comp, gen or mixed, got {self.task!r}")
        for name, table in (("preset", STAGE_HPARAMS), ("model_preset", MODEL_PRESETS)):
            value = getattr(self, name)
            if value is not None and value not in table:
                raise TrainError(f"unknown --{name.replace('_', '-')} {value!r}; choose from {sorted(table)}")
        if self.resume is True:  # the Python API's spelling of a bare --resume
            self.resume = "auto"
        self._check_numbers()
        if self.init is not None and os.path.realpath(self.init) == os.path.realpath(self.output):
            raise TrainError(f"--output {self.output} is the --init model itself: training would overwrite the model it "
                             f"starts from; give another --output")

    def _check_numbers(self) -> None:
        """Numeric options: finite and in range (``--max-steps 0`` or ``--lr nan`` would train nothing or garbage)."""
        positive = ("lr", "projector_lr", "epochs", "global_batch_size", "per_device_batch_size", "max_steps",
                    "max_length", "save_steps", "logging_steps")
        for name in positive + ("warmup_ratio", "dropout", "weight_decay"):
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainError(f"{flag} must be a finite number, got {value}")
            if name in positive and value <= 0:
                raise TrainError(f"{flag} must be positive, got {value}")
            if name != "weight_decay" and name not in positive and not 0 <= value < 1:
                raise TrainError(f"{flag} must be in [0, 1), got {value}")
            if name == "weight_decay" and value < 0:
                raise TrainError(f"{flag} must not be negative, got {value}")
