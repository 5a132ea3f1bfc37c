"""``train_stage``: one stage of the three-stage recipe on transformers' Trainer (``healthgpt train``).

A run is these steps, each a function below, in this order:

1. ``stage_plan``: the stage's hyperparameters (``--preset`` table + overrides) and trainable parts;
2. ``prepare_output``: the output folder, and the checkpoint to resume from (or the refusal to mix runs);
3. ``batch_geometry``: global batch = per-device batch x processes x gradient accumulation;
4. ``check_same_run``: a resumed run must be the run that wrote the checkpoint (data, stage, hyperparameters);
5. ``trainer_arguments``: the Trainer's ``TrainingArguments`` (schedule, engine, saving);
6. ``build_model``: the model: given in memory, loaded from ``--init`` or built from ``--model-preset``;
7. ``apply_stage``: freeze all but the stage's parts -> optimizer groups of Parameters with their rates;
8. ``load_data``: read, validate and VQ-encode the training file;
9. ``shard_for_training`` (``--fsdp`` only): FSDP2-shard the model, optimizer groups of the sharded Parameters;
10. ``build_trainer`` and ``train``; then ``save_final`` (the model) and ``stage_summary`` (``stage.json``).

Each output directory is a complete model (``HealthGPT.save_pretrained``) plus ``stage.json`` (what
was trained, with which hyperparameters, on what), ``loss_log.jsonl``, ``loss_curve.png`` and the
Trainer's ``checkpoint-N`` folders; it is the next stage's ``--init``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
import transformers
from transformers import TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from hlora import CheckpointError, adapter_layers, zero3
from hlora.layer import register_zero3_plugins
from hlora.files import atomic_write
from healthgpt.constants import TASKS
from healthgpt.data.dataset import Collator, build_dataset
from healthgpt.data.vq_cache import file_digest
from healthgpt.model.config import CONFIG_NAME, HealthGPTConfig
from healthgpt.model.files import check_model_files
from healthgpt.model.healthgpt import HealthGPT
from healthgpt.model.weights import RUN_FILES, SAVING_DIR
from healthgpt.training import fsdp
from healthgpt.training.arguments import TrainArguments, TrainError
from healthgpt.training.distributed import EngineError, check_engine, fsdp_engine_options, load_fsdp_config
from healthgpt.training.stages import StagePlan, apply_stage, plan_stage
from healthgpt.training.trainer import LOSS_PNG, HealthGPTTrainer, LossLogCallback, clean_staging, read_loss_log

__all__ = ["train_stage", "TrainArguments", "StageResult", "TrainError", "BatchGeometry", "STAGE_FILE", "RUN_FILE",
           "CONFIGS_DIR"]

# run_config.json: what a resumed run must match; stage.json: the stage's summary ("complete": true marks a
# finished stage). The loader knows them too: it refuses an unfinished run's folder as a model.
RUN_FILE, STAGE_FILE = RUN_FILES
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# deepspeed is published as a source archive whose setup imports torch: built in pip's isolated
# environment it would pull another torch, so it is built against the installed one
DEEPSPEED_INSTALL = "with torch installed: pip install --no-build-isolation deepspeed (the hlora[deepspeed] extra)"


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


@dataclass(frozen=True)
class BatchGeometry:
    """``global_batch = per_device x processes x accumulation`` (exactly)."""

    global_batch: int
    per_device: int
    processes: int
    accumulation: int


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---- the run ----------------------------------------------------------------------------------------


def train_stage(args: TrainArguments, *, model: HealthGPT | None = None, model_overrides: dict | None = None,
                callbacks: list | tuple = (), save_final: bool = True, log=None, quiet: bool = False) -> StageResult:
    """Run one stage (module docstring): the Python API of ``healthgpt train``.

    ``model``: an in-memory ``HealthGPT`` to train instead of building or loading one;
    ``model_overrides``: extra ``HealthGPTConfig`` fields for a model built here; ``callbacks``: more
    ``TrainerCallback``s; ``save_final=False``: no final ``save_pretrained`` (checkpoints still are);
    ``quiet``: no progress bars, no printed lines (the loss log is still written). Returns a
    ``StageResult`` on every process.
    """
    t0 = time.time()
    main = _is_main()
    say = (log or print) if main and not quiet else (lambda *a, **k: None)
    progress = args.progress and not quiet

    preset = args.preset or _read_stage(args.init).get("preset") or args.model_preset or "m3"
    plan = stage_plan(args, preset)
    hp = plan.main
    if not os.path.isfile(args.data):
        raise TrainError(f"training file {args.data} does not exist")
    output, resume_from = prepare_output(args, main, say)
    geometry = batch_geometry(int(hp.global_batch_size), args.per_device_batch_size, _world_size())
    run_config = {
        "stage": args.stage, "task": args.task, "preset": preset, "data": os.path.abspath(args.data),
        "data_sha256": file_digest(args.data), "init": os.path.abspath(args.init) if args.init else None,
        "global_batch_size": geometry.global_batch, "hparams": _hparams(plan), "max_steps": args.max_steps, "seed": args.seed,
        **({"fsdp": True} if args.fsdp else {}),  # its checkpoints are sharded: resumed by --fsdp runs only
    }
    if resume_from:
        check_same_run(output, run_config)
    sharding = fsdp_options(args)
    targs = trainer_arguments(args, output, geometry, plan, say, progress=progress)
    if sharding is not None:
        try:
            fsdp.require_fsdp()  # the Trainer's arguments have set up the process group
        except fsdp.FSDPError as e:
            raise TrainError(str(e)) from None

    if args.deepspeed is not None and targs.use_cpu:
        start_deepspeed_comm()
    # ZeRO-3 (the Trainer's DeepSpeed config says so): transformers builds the LLM and the vision tower
    # under zero.Init, partitioned from the start (hlora.zero3)
    model, source, rebuild = build_model(args, preset, model, model_overrides, say)
    # ZeRO reduces gradients in buckets filled as the backward produces them, and ZeRO-3 gathers each
    # module's weights as it runs: the same graph on every process
    model.run_every_part = args.deepspeed is not None
    if is_deepspeed_zero3_enabled():  # what makes transformers build under zero.Init
        for layer in adapter_layers(model.llm):  # a model given built (not under zero.Init): before it is partitioned
            register_zero3_plugins(layer)
    merged = sorted({layer.merged for layer in adapter_layers(model.llm) if layer.merged is not None})
    if merged:  # training would update plugin weights the merged base already holds: a later unmerge corrupts it
        raise TrainError(f"plugin {merged[0]!r} is merged into the model's base weights: call hlora.unmerge(model.llm) "
                         f"before training")
    plan = apply_stage(model, plan)
    say(f"model {source}; {plan.describe()}")
    say(f"batch: global {geometry.global_batch} = {geometry.per_device} per device x {geometry.processes} process(es) "
        f"x {geometry.accumulation} accumulation; schedule {hp.scheduler} (warm-up {hp.warmup_ratio:g}); "
        f"plugin dropout {plan.dropout}")
    dataset, report = load_data(args, model, targs, int(hp.max_length), say, progress=progress and main)
    if sharding is not None:  # after the data: VQ-encoding runs the image tokenizer outside a sharded forward
        plan = shard_for_training(model, plan, sharding, targs.device, bf16=args.bf16)
        sizes = fsdp.shard_sizes(model)
        say(f"FSDP2: {geometry.processes} processes, each holding {sizes['local']:,} of {sizes['full']:,} sharded "
            f"parameter elements" + (", bf16 compute with fp32 master weights" if args.bf16 else ""))

    if main:
        with open(os.path.join(output, RUN_FILE), "w") as f:
            json.dump(run_config, f, indent=1)
        if os.path.exists(os.path.join(output, STAGE_FILE)):  # the completion marker is written again at the end
            os.remove(os.path.join(output, STAGE_FILE))
    trainer = build_trainer(model, targs, dataset, plan, [LossLogCallback(output, title=f"stage {args.stage} ({args.task})"),
                                                           *callbacks], quiet=quiet)
    train_out = trainer.train(resume_from_checkpoint=resume_from)

    if save_final:
        _save_final(trainer, model, output, main, rebuild)
    losses = [r for r in read_loss_log(output) if "loss" in r] if main else []
    summary = stage_summary(args, preset, plan, geometry, trainer, train_out, report, dataset, source=source,
                            resumed_from=resume_from, seconds=time.time() - t0, losses=losses)
    if main:
        atomic_write(os.path.join(output, "training_args.json"), targs.to_json_string())
        atomic_write(os.path.join(output, STAGE_FILE), json.dumps(summary, indent=1))
    png = os.path.join(output, LOSS_PNG)
    return StageResult(output=output, stage=args.stage, task=args.task, steps=summary["steps"], losses=losses,
                       first_loss=summary["first_loss"], last_loss=summary["last_loss"], seconds=summary["seconds"],
                       loss_curve=png if os.path.isfile(png) else None, summary=summary)


# ---- 1. what the stage trains, at which rates ---------------------------------------------------------


def stage_plan(args: TrainArguments, preset: str) -> StagePlan:
    """The ``preset``'s hyperparameters for the stage with the explicit ones of ``args`` applied."""
    try:
        return plan_stage(args.stage, args.task, preset, projector_lr=args.projector_lr, lr=args.lr,
                          global_batch_size=args.global_batch_size, dropout=args.dropout, scheduler=args.scheduler,
                          warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_length=args.max_length,
                          epochs=args.epochs)
    except ValueError as e:
        raise TrainError(str(e)) from None


def _hparams(plan: StagePlan) -> dict:
    return {k: v.to_dict() for k, v in plan.hparams.items()}


def _read_stage(init: str | None) -> dict:
    """The ``stage.json`` of ``init`` ({} without one); an unfinished stage is refused."""
    path = os.path.join(init, STAGE_FILE) if init else None
    if path is None or not os.path.isfile(path):
        return {}
    with open(path) as f:
        info = json.load(f)
    if not info.get("complete"):
        raise TrainError(f"{init} holds an unfinished stage (its {STAGE_FILE} is not marked complete): finish it with --resume first")
    return info


# ---- 2. output folder and resume --------------------------------------------------------------------


def prepare_output(args: TrainArguments, main: bool, say) -> tuple:
    """-> ``(absolute output folder, checkpoint to resume from or None)``.

    Staging folders and temporary files of a killed save are removed. Checkpoints of an earlier
    run are resumed (``--resume``: the newest readable one; a damaged newer one is skipped with a
    warning), deleted (``--overwrite``: never resumed into the new run) or refused. A saved model
    in ``output`` is never replaced unasked: a new run there needs ``--resume`` or ``--overwrite``.
    """
    output = os.path.abspath(args.output)
    if main:
        os.makedirs(output, exist_ok=True)
        removed = clean_staging(output) + _clean_temporary_files(output)
        if removed:
            say(f"removed unfinished save(s) {removed} from {output}")
    last = get_last_checkpoint(output) if os.path.isdir(output) else None
    if args.resume:
        resume_from = _last_readable_checkpoint(output) if args.resume == "auto" else args.resume
        if resume_from is None:
            raise TrainError(f"--resume: no complete checkpoint in {output}")
        if not os.path.isdir(resume_from):
            raise TrainError(f"--resume: {resume_from} is not a checkpoint directory")
        return output, resume_from
    if last is not None and not args.overwrite:
        raise TrainError(f"{output} already holds checkpoints of a run ({os.path.basename(last)}): pass --resume to "
                         f"continue it or --overwrite to start over")
    saved = [n for n in (CONFIG_NAME, SAVING_DIR) if os.path.exists(os.path.join(output, n))]
    if saved and not args.overwrite:
        raise TrainError(f"{output} already holds a saved model ({saved[0]}): pass --overwrite to replace it, or "
                         f"choose another --output")
    if last is not None and main:
        for name in os.listdir(output):
            if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and os.path.isdir(os.path.join(output, name)):
                shutil.rmtree(os.path.join(output, name))
    return output, None


def _clean_temporary_files(output: str) -> list:
    """Remove the temporary files of atomic writes a kill interrupted (``hlora.files.atomic_write``)."""
    removed = []
    for name in os.listdir(output):
        if name.startswith(".tmp-") and os.path.isfile(os.path.join(output, name)):
            os.remove(os.path.join(output, name))
            removed.append(name)
    return removed


def _last_readable_checkpoint(output: str) -> str | None:
    """The newest ``checkpoint-N`` whose files all read (``check_model_files``); newer damaged ones
    are skipped with a warning naming the damage."""
    found = [n for n in os.listdir(output) if n.startswith(PREFIX_CHECKPOINT_DIR + "-")
             and n[len(PREFIX_CHECKPOINT_DIR) + 1:].isdigit() and os.path.isdir(os.path.join(output, n))]
    for name in sorted(found, key=lambda n: int(n[len(PREFIX_CHECKPOINT_DIR) + 1:]), reverse=True):
        path = os.path.join(output, name)
        try:
            if not os.path.isfile(os.path.join(path, "trainer_state.json")):
                raise CheckpointError(f"{path} has no trainer_state.json")
            check_model_files(path, "checkpoint")
        except CheckpointError as e:
            warnings.warn(f"--resume: skipping damaged checkpoint {name} (resuming from an earlier one): {e}", stacklevel=2)
            continue
        return path
    return None


def check_same_run(output: str, run_config: dict) -> None:
    """Resuming continues the same run: refuse when ``run_config`` differs from the one saved in ``output``."""
    path = os.path.join(output, RUN_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = json.load(f)
    diff = [k for k in [*run_config, *(k for k in before if k not in run_config)] if before.get(k) != run_config.get(k)]
    if diff:
        raise TrainError(f"--resume: this run differs from the one in {output} in {diff}; resuming continues the same run")


# ---- 3. batch geometry ----------------------------------------------------------------------------


def batch_geometry(global_batch: int, per_device: int | None, processes: int) -> BatchGeometry:
    """Split the global batch over ``processes``: ``per_device`` defaults to ``min(4, global / processes)``;
    the rest is gradient accumulation, which must come out whole."""
    per_device = per_device or max(1, min(4, global_batch // processes))
    if global_batch % (per_device * processes):
        raise TrainError(f"global batch {global_batch} is not a multiple of per-device batch {per_device} x {processes} processes")
    return BatchGeometry(global_batch, per_device, processes, global_batch // (per_device * processes))


# ---- 5. the Trainer's arguments -----------------------------------------------------------------------


def trainer_arguments(args: TrainArguments, output: str, geometry: BatchGeometry, plan: StagePlan, say,
                      progress: bool = True) -> TrainingArguments:
    """transformers' ``TrainingArguments`` for the run (learning rates are per group: the optimizer's)."""
    hp = plan.main
    use_cpu = args.cpu or not torch.cuda.is_available()
    if use_cpu and (args.bf16 or args.fp16):
        say("note: mixed precision on the CPU is slow; the paper trained bf16 on GPUs")
    if args.deepspeed is not None and not os.path.isfile(args.deepspeed):
        raise TrainError(f"--deepspeed {args.deepspeed}: no such config file (examples: {CONFIGS_DIR}/zero2.json, zero3.json)")
    try:  # an engine that cannot run as asked stops here rather than train as something else
        check_engine(fsdp=args.fsdp, deepspeed=args.deepspeed, fp16=args.fp16, load_in_4bit=args.load_in_4bit)
    except EngineError as e:
        raise TrainError(str(e)) from None
    if args.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise TrainError(f"--deepspeed needs the deepspeed package, which is not installed ({DEEPSPEED_INSTALL})")
    distributed = geometry.processes > 1
    try:
        return TrainingArguments(
            output_dir=output,
            per_device_train_batch_size=geometry.per_device,
            gradient_accumulation_steps=geometry.accumulation,
            learning_rate=float(hp.lr if hp.lr is not None else (hp.projector_lr or 1e-4)),  # groups set their own
            weight_decay=float(hp.weight_decay),
            num_train_epochs=float(hp.epochs),
            max_steps=args.max_steps if args.max_steps is not None else -1,
            lr_scheduler_type=hp.scheduler,
            warmup_steps=float(hp.warmup_ratio),  # < 1: a fraction of the steps
            logging_steps=args.logging_steps,
            logging_first_step=True,
            save_strategy="steps",
            save_steps=args.save_steps,
            save_total_limit=args.save_total_limit,
            seed=args.seed,
            # --fsdp: the engine's mixed-precision policy casts (no autocast on top), and the Trainer saves
            # only what HealthGPTTrainer writes for a sharded model (its contract for a model it did not shard)
            bf16=args.bf16 and not args.fsdp,
            fp16=args.fp16,
            deepspeed=args.deepspeed,
            save_only_model=args.fsdp,
            use_cpu=use_cpu,
            ddp_backend="gloo" if use_cpu and distributed else None,
            # a batch of one task leaves the other's parts idle
            ddp_find_unused_parameters=True if distributed and not args.fsdp else None,
            dataloader_num_workers=args.num_workers,
            dataloader_pin_memory=not use_cpu,
            remove_unused_columns=False,  # the collator needs "task"
            report_to=args.report_to,
            disable_tqdm=not progress,
            # transformers 5 renamed gradient_checkpointing (deprecated, still read) to activation_checkpointing
            **{("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                else "gradient_checkpointing"): args.gradient_checkpointing},
        )
    except (ImportError, ValueError) as e:
        raise TrainError(f"the Trainer refused these engine options: {e}") from e


def fsdp_options(args: TrainArguments) -> dict | None:
    """``--fsdp``: the engine's ``shard_model`` options from ``--fsdp-config`` (default ``configs/fsdp.json``);
    None without ``--fsdp``. An option the engine does not implement is a ``TrainError``."""
    if args.fsdp_config is not None and not args.fsdp:
        raise TrainError("--fsdp-config without --fsdp: pass --fsdp to shard the model")
    if not args.fsdp:
        return None
    if args.load_in_4bit:
        raise TrainError("--fsdp with --load-in-4bit: FSDP2 does not shard bitsandbytes 4-bit weights; drop one (stage 3 "
                         "of M3 and L14 fits one 80 GB GPU even in bf16: healthgpt/training/configs/README.md)")
    try:
        return fsdp_engine_options(load_fsdp_config(args.fsdp_config or os.path.join(CONFIGS_DIR, "fsdp.json")))
    except EngineError as e:
        raise TrainError(str(e)) from None


def start_deepspeed_comm() -> None:
    """``--deepspeed`` on CPU processes: accelerate's CPU state never starts ``deepspeed.comm`` (on
    GPUs it does), so DeepSpeed would see a world size of 1 and ZeRO-3's ``zero.Init`` partition
    nothing; start it on the process group the Trainer's arguments opened (gloo), before the model
    is built.

    Starting it on DeepSpeed's CPU accelerator JIT-compiles the ``deepspeed_shm_comm`` op (a
    shared-memory all-reduce between the processes of one node; a C++ build of about 15 minutes on
    a loaded 2-core machine), unless ``deepspeed.ops.__compatible_ops__`` says the op is unavailable,
    which is the only switch it reads (``deepspeed.comm.torch.build_shm_op``; no environment
    variable). It is switched off here: the reductions then go through the gloo group, as every
    other collective of the run does, and a CPU run starts in seconds. Only this CPU path: on GPUs
    accelerate starts the comm and NCCL reduces."""
    import deepspeed  # optional: present whenever --deepspeed runs (trainer_arguments checked)
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


# ---- 6. the model ---------------------------------------------------------------------------------


def build_model(args: TrainArguments, preset: str, given: HealthGPT | None, model_overrides: dict | None, say) -> tuple:
    """-> ``(model, where it came from, rebuild)``; ``rebuild()`` makes the starting model again (the
    FSDP final save loads the gathered weights into it)."""
    transformers.set_seed(args.seed)
    if args.init is not None:
        if not os.path.isdir(args.init):
            raise TrainError(f"--init {args.init} is not a directory")
        overrides = {k: v for k, v in dict(llm_path=args.llm_path, vision_path=args.vision_path, dtype=args.dtype,
                                           load_in_4bit=args.load_in_4bit or None).items() if v is not None}

        def rebuild():
            return HealthGPT.from_pretrained(args.init, **overrides)

        source = f"loaded from {args.init}"
    else:
        fields = dict(llm_path=args.llm_path, vision_path=args.vision_path, tokenizer_path=args.tokenizer_path,
                      image_tokenizer_path=args.image_tokenizer_path, dtype=args.dtype,
                      load_in_4bit=args.load_in_4bit or None)
        cfg_overrides = {**{k: v for k, v in fields.items() if v is not None}, **(model_overrides or {})}
        name = args.model_preset or preset

        def rebuild():
            transformers.set_seed(args.seed)
            return HealthGPT(HealthGPTConfig.preset(name, **cfg_overrides))

        source = f"built from the {name!r} model preset" + (" (random weights)" if not (args.llm_path or args.vision_path) else "")
        if args.stage != 1 and given is None:
            say(f"warning: stage {args.stage} without --init starts from untrained projectors/plugins")
    if given is not None:
        return given, "given in memory", rebuild
    return rebuild(), source, rebuild


# ---- 8. the data ----------------------------------------------------------------------------------


def load_data(args: TrainArguments, model: HealthGPT, targs: TrainingArguments, max_length: int, say, progress: bool) -> tuple:
    """-> ``(TrainingDataset, LoadReport)``; the main process encodes first, the others read its cache."""
    with targs.main_process_first(desc="reading and VQ-encoding the training data"):
        dataset, report, _ = build_dataset(model, args.data, task=args.task, skip_bad=args.skip_bad,
                                           image_folder=args.image_folder, cache_dir=args.cache_dir, max_length=max_length,
                                           progress=progress, log=say, device=targs.device)
    counts = {t: dataset.tasks.count(t) for t in TASKS}
    if args.task == "mixed" and args.stage != 2 and not all(counts.values()):
        say(f"note: --task mixed but the data holds {counts}; only the parts of present tasks get gradients")
    return dataset, report


# ---- 9. sharding (--fsdp) ----------------------------------------------------------------------------


def shard_for_training(model: HealthGPT, plan: StagePlan, options: dict, device, bf16: bool) -> StagePlan:
    """Shard ``model`` in place with the FSDP2 engine (``healthgpt.training.fsdp.shard_model``, bf16
    compute with ``bf16``) -> ``plan`` whose optimizer groups hold the sharded Parameters
    (``fully_shard`` replaces every Parameter by a DTensor one under the same name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g, [names[id(p)] for p in g["params"]]) for g in plan.groups]
    if device.type != "cpu":
        model.to(device)  # the Trainer does not place a model it did not shard
    fsdp.shard_model(model, mixed_precision="bf16" if bf16 else None, **options)
    # The Trainer's flag for a model sharded before it: no DDP wrap, no re-sharding, no device move
    model.is_distributed_loading_by_transformers = True
    params = dict(model.named_parameters())
    return replace(plan, groups=[{**g, "params": [params[n] for n in group]} for g, group in groups])


# ---- 10. trainer, final model, summary ---------------------------------------------------------------


def build_trainer(model: HealthGPT, targs: TrainingArguments, dataset, plan: StagePlan, callbacks: list,
                  quiet: bool = False) -> HealthGPTTrainer:
    trainer = HealthGPTTrainer(model=model, args=targs, train_dataset=dataset, data_collator=Collator(model.pad_id),
                               param_groups=plan.groups, callbacks=callbacks)
    if quiet:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    return trainer


def _save_final(trainer: HealthGPTTrainer, model: HealthGPT, output: str, main: bool, rebuild) -> None:
    """The trained model as ``HealthGPT.save_pretrained`` writes it, from the main process.

    DeepSpeed ZeRO-3: the partitioned parameters are gathered first. FSDP: the full state dict is
    gathered to the main process (``fsdp.gather_state_dict``) and loaded into a fresh copy of the
    starting model (``rebuild()``), which is saved; the sharded training model is never touched
    outside collectives.
    """
    if trainer.is_deepspeed_enabled:
        with zero3.gathered(model.parameters()):  # ZeRO-3: every process joins the gather, the main one saves
            if main:
                model.save_pretrained(output)
    elif fsdp.is_sharded(model):
        state = fsdp.gather_state_dict(model)  # full, on the main process; {} on the others
        if main:
            fresh = rebuild()
            result = fresh.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise RuntimeError(f"FSDP state dict does not match the model: missing {result.missing_keys[:5]}, "
                                   f"unexpected {result.unexpected_keys[:5]}")
            fresh.save_pretrained(output)
    elif main:
        model.save_pretrained(output)
    if trainer.args.world_size > 1:
        trainer.args.distributed_state.wait_for_everyone()


def stage_summary(args: TrainArguments, preset: str, plan: StagePlan, geometry: BatchGeometry, trainer, train_out,
                  report, dataset, *, source: str, resumed_from: str | None, seconds: float, losses: list) -> dict:
    """What ``stage.json`` records; ``losses``: the loss-log rows."""
    return {
        "complete": True, "stage": args.stage, "task": args.task, "preset": preset, "data": os.path.abspath(args.data),
        "rows": report.kept, "rows_by_task": {t: dataset.tasks.count(t) for t in TASKS}, "skipped_rows": dict(report.skipped),
        "init": os.path.abspath(args.init) if args.init else None, "model_source": source,
        "trained": [{"name": g["name"], "lr": g["lr"], "tensors": len(g["params"])} for g in plan.groups],
        "dropout": plan.dropout, "hparams": _hparams(plan),
        "global_batch_size": geometry.global_batch, "per_device_batch_size": geometry.per_device,
        "processes": geometry.processes, "gradient_accumulation": geometry.accumulation,
        "steps": trainer.state.global_step, "train_loss": train_out.training_loss,
        "first_loss": losses[0]["loss"] if losses else None, "last_loss": losses[-1]["loss"] if losses else None,
        "seconds": round(seconds, 2), "resumed_from": resumed_from,
        "engine": {"deepspeed": args.deepspeed, "fsdp": args.fsdp, "bf16": args.bf16, "fp16": args.fp16,
                   "gradient_checkpointing": args.gradient_checkpointing, "device": str(trainer.args.device)},
    }
