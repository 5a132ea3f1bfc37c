"""``healthgpt train``: one stage of the three-stage recipe on transformers' Trainer.

    healthgpt train --stage 1 --task comp  --data align.json    --output out/s1-comp --preset m3 \\
        --llm-path Phi-3-mini-4k-instruct --vision-path clip-vit-large-patch14-336 --image-tokenizer-path vqgan
    healthgpt train --stage 1 --task gen   --data recon.json    --output out/s1-gen  --init out/s1-comp
    healthgpt train --stage 2 --task mixed --data mixed47k.json --output out/s2      --init out/s1-gen
    healthgpt train --stage 3 --task comp  --data vqa.json      --output out/s3-comp --init out/s2
    healthgpt train --stage 3 --task gen   --data conv.json     --output out/s3-gen  --init out/s3-comp

Each output directory is a complete model (``HealthGPT.save_pretrained``) plus ``stage.json`` (what
was trained, with which hyperparameters, on what), ``loss_log.jsonl``, ``loss_curve.png`` and the
Trainer's ``checkpoint-N`` folders; it is the next stage's ``--init``. Stage 1 without ``--init``
builds the model from ``--preset`` (``tiny``: random weights, no files; ``m3``/``l14``: random unless
``--llm-path``/``--vision-path``/``--image-tokenizer-path`` point at local checkpoints).

Scale-out is the Trainer's: ``torchrun --nproc_per_node 8 -m healthgpt.training ...`` (or
``accelerate launch``), ``--deepspeed healthgpt/training/configs/zero2.json`` (or ``zero3.json``),
``--fsdp`` (``--fsdp-config``, default ``healthgpt/training/configs/fsdp.json``), ``--bf16``,
``--gradient-checkpointing``. ``--global-batch-size`` is kept whatever the number of processes:
gradient accumulation = global / (per-device batch x processes).

``--resume`` continues the run in ``--output`` from its last complete checkpoint (same data order,
optimizer, scheduler and RNG state); ``--resume PATH`` from a given checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from healthgpt.cli import subcommand
from hlora.files import atomic_write

__all__ = ["add_train_arguments", "run_train", "register", "train_stage", "StageResult", "TrainError", "STAGE_FILE"]

STAGE_FILE = "stage.json"

RUN_FILE = "run_config.json"


class TrainError(RuntimeError):
    """A training run that cannot start as asked; the message says why and what to pass."""


@dataclass
class StageResult:
    output: str
    stage: int
    task: str
    steps: int
    losses: list = field(default_factory=list)  # loss_log rows
    first_loss: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0
    loss_curve: str | None = None
    summary: dict = field(default_factory=dict)


# ---- arguments ---------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``healthgpt train`` options (the module docstring shows the recipe)."""
    g = parser.add_argument_group("stage")
    g.add_argument("--stage", type=int, choices=(1, 2, 3), required=True, help="training stage (paper section 4)")
    g.add_argument("--task", choices=("comp", "gen", "mixed"), default=None,
                   help="comp, gen, or mixed (both tasks, each sample routed to its plugin); default: mixed for stage 2, else required")
    g.add_argument("--data", required=True, help="training file (LLaVA-style JSON/JSONL, see healthgpt.data.format)")
    g.add_argument("--output", required=True, help="output directory: the trained model, logs and checkpoints")
    g.add_argument("--init", default=None, help="start from this model directory (the previous stage's --output)")
    g.add_argument("--preset", default=None, choices=("m3", "l14", "tiny"),
                   help="hyperparameters of Table 7 (m3, l14) or the CPU demo's (tiny); default: the --init run's, else m3")
    m = parser.add_argument_group("model (stage 1 without --init)")
    m.add_argument("--model-preset", default=None, choices=("m3", "l14", "tiny"), help="model architecture preset (default: --preset)")
    m.add_argument("--llm-path", default=None, help="local Phi-3-mini / phi-4 checkpoint directory")
    m.add_argument("--vision-path", default=None, help="local CLIP ViT-L/14-336 checkpoint directory")
    m.add_argument("--tokenizer-path", default=None, help="local tokenizer directory (default: the LLM's)")
    m.add_argument("--image-tokenizer-path", default=None, help="VQGAN directory (healthgpt convert-vqgan)")
    m.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="model weights dtype")
    h = parser.add_argument_group("hyperparameters (default: the preset's)")
    h.add_argument("--lr", type=float, default=None, help="learning rate of plugins / fusion layer")
    h.add_argument("--projector-lr", type=float, default=None, help="learning rate of the projector(s)")
    h.add_argument("--global-batch-size", type=int, default=None)
    h.add_argument("--per-device-batch-size", type=int, default=None, help="default: min(4, global / processes)")
    h.add_argument("--epochs", type=float, default=None)
    h.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    h.add_argument("--scheduler", default=None, help="cosine (with warm-up), constant, linear, ... (transformers names)")
    h.add_argument("--warmup-ratio", type=float, default=None)
    h.add_argument("--dropout", type=float, default=None, help="H-LoRA dropout of the plugins")
    h.add_argument("--weight-decay", type=float, default=None)
    h.add_argument("--max-length", type=int, default=None, help="token limit per sample (default 2048)")
    h.add_argument("--seed", type=int, default=42)
    d = parser.add_argument_group("data")
    d.add_argument("--image-folder", default=None, help="resolve relative image paths here first")
    d.add_argument("--skip-bad", action="store_true", help="drop bad rows (counted) instead of stopping at the first")
    d.add_argument("--cache-dir", default=None, help="VQ-id cache root (default $HEALTHGPT_CACHE or ~/.cache/healthgpt)")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    e = parser.add_argument_group("engine")
    e.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    e.add_argument("--fp16", action="store_true", help="fp16 mixed precision")
    e.add_argument("--gradient-checkpointing", action="store_true")
    e.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (configs/zero2.json, configs/zero3.json)")
    e.add_argument("--fsdp", action="store_true", help="PyTorch FSDP (configure it with --fsdp-config)")
    e.add_argument("--fsdp-config", default=None, help="FSDP config JSON (default with --fsdp: configs/fsdp.json)")
    e.add_argument("--save-steps", type=int, default=500, help="checkpoint every N optimizer steps")
    e.add_argument("--save-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    e.add_argument("--logging-steps", type=int, default=10)
    e.add_argument("--resume", nargs="?", const="auto", default=None, help="continue from the last checkpoint in --output (or from PATH)")
    e.add_argument("--overwrite", action="store_true", help="start over even if --output holds checkpoints of an earlier run")
    e.add_argument("--report-to", default="none", help="transformers integrations (tensorboard, wandb...); default none")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return parser


def run_train(args: argparse.Namespace) -> int:
    """``healthgpt train``: run one stage; 0 on success, 2 on a usage/data error (message on stderr)."""
    from healthgpt.data.format import DataError

    try:
        result = train_stage(**_kwargs_from_args(args))
    except (TrainError, DataError, FileNotFoundError) as e:
        print(f"healthgpt train: error: {e}", file=sys.stderr)
        return 2
    if result is not None and _is_main():
        first, last = result.first_loss, result.last_loss
        print(f"stage {result.stage} {result.task}: {result.steps} steps in {result.seconds:.1f}s, "
              f"loss {first:.3f} -> {last:.3f}; model in {result.output}" if first is not None else
              f"stage {result.stage} {result.task}: model in {result.output}")
    return 0


def _kwargs_from_args(args) -> dict:
    keys = ["stage", "task", "data", "output", "init", "preset", "model_preset", "llm_path", "vision_path",
            "tokenizer_path", "image_tokenizer_path", "dtype", "lr", "projector_lr", "global_batch_size",
            "per_device_batch_size", "epochs", "max_steps", "scheduler", "warmup_ratio", "dropout", "weight_decay",
            "max_length", "seed", "image_folder", "skip_bad", "cache_dir", "num_workers", "bf16", "fp16",
            "gradient_checkpointing", "deepspeed", "fsdp", "fsdp_config", "save_steps", "save_total_limit",
            "logging_steps", "resume", "overwrite", "report_to", "cpu"]
    kw = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    kw["progress"] = not getattr(args, "no_progress", False)
    return kw


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _training_arguments(cls, kwargs: dict):
    import importlib.metadata

    if kwargs.get("deepspeed"):
        try:
            importlib.metadata.version("deepspeed")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError("--deepspeed needs the deepspeed package, which is not installed") from None
    return cls(**kwargs)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _read_stage(init: str | None) -> dict:
    if init is None:
        return {}
    path = os.path.join(init, STAGE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            info = json.load(f)
        if not info.get("complete"):
            raise TrainError(f"{init} holds an unfinished stage (its {STAGE_FILE} is not marked complete): finish it with --resume first")
        return info
    return {}


# ---- the run ----------------------------------------------------------------------------------------


def train_stage(
    *,
    stage: int,
    data: str,
    output: str,
    task: str | None = None,
    init: str | None = None,
    preset: str | None = None,
    model=None,
    model_preset: str | None = None,
    llm_path: str | None = None,
    vision_path: str | None = None,
    tokenizer_path: str | None = None,
    image_tokenizer_path: str | None = None,
    dtype: str | None = None,
    model_overrides: dict | None = None,
    lr: float | None = None,
    projector_lr: float | None = None,
    global_batch_size: int | None = None,
    per_device_batch_size: int | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    scheduler: str | None = None,
    warmup_ratio: float | None = None,
    dropout: float | None = None,
    weight_decay: float | None = None,
    max_length: int | None = None,
    seed: int = 42,
    image_folder: str | None = None,
    skip_bad: bool = False,
    cache_dir: str | None = None,
    num_workers: int = 0,
    bf16: bool = False,
    fp16: bool = False,
    gradient_checkpointing: bool = False,
    deepspeed: str | None = None,
    fsdp: bool = False,
    fsdp_config: str | None = None,
    save_steps: int = 500,
    save_total_limit: int | None = None,
    logging_steps: int = 10,
    resume: str | bool | None = None,
    overwrite: bool = False,
    report_to: str = "none",
    cpu: bool = False,
    progress: bool = True,
    save_final: bool = True,
    callbacks: list | None = None,
    log=None,
    quiet: bool = False,
) -> StageResult:
    """Run one stage (module docstring). Python API of ``healthgpt train``; ``model``: an in-memory
    ``HealthGPT`` to train instead of building or loading one; ``model_overrides``: extra
    ``HealthGPTConfig`` fields for a fresh model; ``quiet``: no progress bars, no printed log lines
    (the loss log is still written). Returns a ``StageResult`` on every process."""
    import torch
    import transformers
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from healthgpt.data.dataset import Collator, build_dataset
    from healthgpt.training.stages import apply_stage, plan_stage
    from healthgpt.training.trainer import HealthGPTTrainer, LossLogCallback, clean_staging

    t0 = time.time()
    main = _is_main()
    say = (log or print) if main and not quiet else (lambda *a, **k: None)
    progress = progress and not quiet
    if task is None:
        if stage != 2:
            raise TrainError(f"stage {stage} needs --task comp, gen or mixed")
        task = "mixed"
    init_info = _read_stage(init)
    preset = preset or init_info.get("preset") or (model_preset if model_preset else None) or "m3"
    try:
        plan = plan_stage(stage, task, preset, projector_lr=projector_lr, lr=lr, global_batch_size=global_batch_size,
                          dropout=dropout, scheduler=scheduler, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                          max_length=max_length, epochs=epochs)
    except ValueError as e:
        raise TrainError(str(e)) from None
    hp = plan.main
    if not os.path.isfile(data):
        raise TrainError(f"training file {data} does not exist")

    # ---- output folder, resume -------------------------------------------------------------------
    output = os.path.abspath(output)
    if main:
        os.makedirs(output, exist_ok=True)
        removed = clean_staging(output)
        if removed:
            say(f"removed unfinished checkpoint save(s) {removed} from {output}")
    last = get_last_checkpoint(output) if os.path.isdir(output) else None
    resume_from = None
    if resume:
        resume_from = last if resume in ("auto", True) else resume
        if resume_from is None:
            raise TrainError(f"--resume: no complete checkpoint in {output}")
        if not os.path.isdir(resume_from):
            raise TrainError(f"--resume: {resume_from} is not a checkpoint directory")
    elif last is not None and not overwrite:
        raise TrainError(f"{output} already holds checkpoints of a run ({os.path.basename(last)}): pass --resume to "
                         f"continue it or --overwrite to start over")
    elif last is not None and main:  # --overwrite: an old checkpoint must never be resumed into the new run
        import shutil

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        for name in os.listdir(output):
            if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and os.path.isdir(os.path.join(output, name)):
                shutil.rmtree(os.path.join(output, name))

    # ---- batch geometry ---------------------------------------------------------------------------
    world = _world_size()
    gbs = int(hp.global_batch_size)
    per_device = per_device_batch_size or max(1, min(4, gbs // world))
    if gbs % (per_device * world):
        raise TrainError(f"global batch {gbs} is not a multiple of per-device batch {per_device} x {world} processes")
    accum = gbs // (per_device * world)

    run_config = {
        "stage": stage, "task": task, "preset": preset, "data": os.path.abspath(data), "data_sha256": _file_digest(data),
        "init": os.path.abspath(init) if init else None, "global_batch_size": gbs, "hparams": {k: v.to_dict() for k, v in plan.hparams.items()},
        "max_steps": max_steps, "seed": seed,
    }
    run_path = os.path.join(output, RUN_FILE)
    if resume_from and os.path.isfile(run_path):
        with open(run_path) as f:
            before = json.load(f)
        diff = [k for k in run_config if before.get(k) != run_config[k]]
        if diff:
            raise TrainError(f"--resume: this run differs from the one in {output} in {diff}; resuming continues the same run")

    # ---- engine arguments -------------------------------------------------------------------------
    use_cpu = cpu or not torch.cuda.is_available()
    if use_cpu and (bf16 or fp16):
        say("note: mixed precision on the CPU is slow; the paper trained bf16 on GPUs")
    if fsdp and fsdp_config is None:
        fsdp_config = os.path.join(CONFIGS_DIR, "fsdp.json")
    if deepspeed is not None and not os.path.isfile(deepspeed):
        raise TrainError(f"--deepspeed {deepspeed}: no such config file (examples: {CONFIGS_DIR}/zero2.json, zero3.json)")
    try:
        targs = _training_arguments(TrainingArguments, dict(
            output_dir=output,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accum,
            learning_rate=float(hp.lr if hp.lr is not None else (hp.projector_lr or 1e-4)),  # groups set their own
            weight_decay=float(hp.weight_decay),
            num_train_epochs=float(hp.epochs),
            max_steps=max_steps if max_steps is not None else -1,
            lr_scheduler_type=hp.scheduler,
            warmup_steps=float(hp.warmup_ratio),  # < 1: a fraction of the steps
            logging_steps=logging_steps,
            logging_first_step=True,
            save_strategy="steps",
            save_steps=save_steps,
            save_total_limit=save_total_limit,
            seed=seed,
            bf16=bf16,
            fp16=fp16,
            deepspeed=deepspeed,
            fsdp=bool(fsdp),
            fsdp_config=fsdp_config if fsdp else None,
            use_cpu=use_cpu,
            ddp_backend="gloo" if use_cpu and world > 1 else None,
            ddp_find_unused_parameters=True if world > 1 else None,  # a batch of one task leaves the other's parts idle
            dataloader_num_workers=num_workers,
            dataloader_pin_memory=not use_cpu,
            remove_unused_columns=False,  # the collator needs "task"
            report_to=report_to,
            disable_tqdm=not progress,
            # transformers 5 renamed gradient_checkpointing (deprecated, still read) to activation_checkpointing
            **{("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                else "gradient_checkpointing"): gradient_checkpointing},
        ))
    except (ImportError, ValueError) as e:  # e.g. --deepspeed without the deepspeed package
        hint = " (pip install deepspeed)" if deepspeed and "deepspeed" in str(e).lower() else ""
        raise TrainError(f"the Trainer refused these engine options: {e}{hint}") from e

    # ---- model --------------------------------------------------------------------------------------
    from healthgpt.model.config import HealthGPTConfig
    from healthgpt.model.healthgpt import HealthGPT

    transformers.set_seed(seed)
    given = model
    if init is not None:
        if not os.path.isdir(init):
            raise TrainError(f"--init {init} is not a directory")
        overrides = {k: v for k, v in dict(llm_path=llm_path, vision_path=vision_path, dtype=dtype).items() if v is not None}

        def rebuild():
            return HealthGPT.from_pretrained(init, **overrides)

        source = f"loaded from {init}"
    else:
        cfg_overrides = {k: v for k, v in dict(llm_path=llm_path, vision_path=vision_path, tokenizer_path=tokenizer_path,
                                              image_tokenizer_path=image_tokenizer_path, dtype=dtype).items() if v is not None}
        cfg_overrides.update(model_overrides or {})
        name = model_preset or preset

        def rebuild():
            transformers.set_seed(seed)
            return HealthGPT(HealthGPTConfig.preset(name, **cfg_overrides))

        source = f"built from the {name!r} preset" + (" (random weights)" if not (llm_path or vision_path) else "")
        if stage != 1 and given is None:
            say(f"warning: stage {stage} without --init starts from untrained projectors/plugins")
    if given is not None:
        model, source = given, "given in memory"
    else:
        model = rebuild()
    plan = apply_stage(model, plan)
    say(f"model {source}; {plan.describe()}")
    say(f"batch: global {gbs} = {per_device} per device x {world} process(es) x {accum} accumulation; "
        f"schedule {hp.scheduler} (warm-up {hp.warmup_ratio:g}); plugin dropout {plan.dropout}")

    # ---- data ----------------------------------------------------------------------------------------
    with targs.main_process_first(desc="reading and VQ-encoding the training data"):
        dataset, report, _ = build_dataset(model, data, task=task, skip_bad=skip_bad, image_folder=image_folder,
                                           cache_dir=cache_dir, max_length=int(hp.max_length), progress=progress and main,
                                           log=say, device=targs.device)
    counts = {t: dataset.tasks.count(t) for t in ("comp", "gen")}
    if task == "mixed" and stage != 2 and (not counts["comp"] or not counts["gen"]):
        say(f"note: --task mixed but the data holds {counts}; only the parts of present tasks get gradients")

    if main:
        with open(run_path, "w") as f:
            json.dump(run_config, f, indent=1)
        stale = os.path.join(output, STAGE_FILE)  # the completion marker is written again at the end
        if os.path.exists(stale):
            os.remove(stale)
    trainer = HealthGPTTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=Collator(model.pad_id),
        param_groups=plan.groups,
        callbacks=[LossLogCallback(output, title=f"stage {stage} ({task})"), *(callbacks or [])],
    )
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    train_out = trainer.train(resume_from_checkpoint=resume_from)

    # ---- the stage's output ----------------------------------------------------------------------
    from healthgpt.training.trainer import LOSS_PNG, read_loss_log

    if save_final:
        _save_final(trainer, model, output, main, rebuild)
    rows = read_loss_log(output) if main else []
    losses = [r for r in rows if "loss" in r]
    summary = {
        "complete": True, "stage": stage, "task": task, "preset": preset, "data": os.path.abspath(data),
        "rows": report.kept, "rows_by_task": counts, "skipped_rows": dict(report.skipped),
        "init": os.path.abspath(init) if init else None, "model_source": source,
        "trained": [{"name": g["name"], "lr": g["lr"], "tensors": len(g["params"])} for g in plan.groups],
        "dropout": plan.dropout, "hparams": {k: v.to_dict() for k, v in plan.hparams.items()},
        "global_batch_size": gbs, "per_device_batch_size": per_device, "processes": world, "gradient_accumulation": accum,
        "steps": trainer.state.global_step, "train_loss": train_out.training_loss,
        "first_loss": losses[0]["loss"] if losses else None, "last_loss": losses[-1]["loss"] if losses else None,
        "seconds": round(time.time() - t0, 2), "resumed_from": resume_from,
        "engine": {"deepspeed": deepspeed, "fsdp": fsdp, "bf16": bf16, "fp16": fp16,
                   "gradient_checkpointing": gradient_checkpointing, "device": str(targs.device)},
    }
    if main:
        with open(os.path.join(output, "training_args.json"), "w") as f:
            f.write(targs.to_json_string())
        atomic_write(os.path.join(output, STAGE_FILE), json.dumps(summary, indent=1))
    png = os.path.join(output, LOSS_PNG)
    return StageResult(output=output, stage=stage, task=task, steps=trainer.state.global_step, losses=losses,
                       first_loss=summary["first_loss"], last_loss=summary["last_loss"], seconds=summary["seconds"],
                       loss_curve=png if os.path.isfile(png) else None, summary=summary)


def _save_final(trainer, model, output: str, main: bool, rebuild) -> None:
    """The trained model as ``HealthGPT.save_pretrained`` writes it, from the main process.

    DeepSpeed ZeRO-3: the partitioned parameters are gathered first. FSDP: the full state dict is
    gathered to the main process and loaded into a fresh copy of the starting model (``rebuild()``),
    which is saved; the sharded training model is never touched outside collectives.
    """
    args = trainer.args
    if trainer.is_deepspeed_enabled:
        import deepspeed  # present whenever --deepspeed runs

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if main:
                model.save_pretrained(output)
    elif trainer.is_fsdp_enabled:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # full, on the main process
        if main:
            fresh = rebuild()
            result = fresh.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise RuntimeError(f"FSDP state dict does not match the model: missing {result.missing_keys[:5]}, "
                                   f"unexpected {result.unexpected_keys[:5]}")
            fresh.save_pretrained(output)
    elif main:
        model.save_pretrained(output)
    if args.world_size > 1:
        args.distributed_state.wait_for_everyone()


register, main = subcommand('train', 'train one stage of the three-stage recipe', __doc__, add_train_arguments, run_train)
