"""Which sharding engine a ``healthgpt train`` run may use here, and the configs it reads.

Nothing trains as something else: an engine option that cannot run as asked stops the run with
``EngineError`` naming why and what to use instead.

- **DeepSpeed** (deepspeed 0.19.8 through the HF Trainer; causes in ``configs/README.md``, with file
  and line): ZeRO-2 and ZeRO-3 run on GPUs and on CPU processes (gloo; ``healthgpt.training.run``
  starts ``deepspeed.comm``, which accelerate leaves unstarted on CPUs), mixed batches included: the
  run sets ``HealthGPT.run_every_part``, so every process runs every plugin, the vision tower and
  every projector (on zero rows when its micro-batch has none of that task) and produces the same
  gradients in the same order, which ZeRO's gradient buckets need, and joins the same ZeRO-3
  parameter gathers. ZeRO-3 builds the model under ``zero.Init`` (transformers does, for the LLM and
  the vision tower; its vocabulary resize makes whole new embedding matrices, partitioned later by
  ``deepspeed.initialize`` with the plugins and projectors): the H-LoRA layers read the base's whole
  shape (``ds_shape``) and register their plugins' tensors to be gathered with the base weight
  (``hlora.layer.register_zero3_plugins``), ``--init`` copies each saved tensor in through a gather
  (``hlora.copy_checked``, ``hlora.zero3``), and the final save gathers the model. ZeRO-3 with
  ``--load-in-4bit`` is refused: 4-bit weights cannot be partitioned.
- **FSDP** (``--fsdp``) is our FSDP2 engine (``healthgpt.training.fsdp``) on every device: the model
  is sharded before the Trainer sees it (accelerate 1.15 keeps DDP for CPU processes whatever its
  FSDP plugin says, so the Trainer's own FSDP would train unsharded there), with the options of
  ``configs/fsdp.json`` that the engine implements (``fsdp_engine_options``); an option it does not
  implement (CPU offload, FSDP's own activation checkpointing, full state dicts, size-based wrapping)
  or ``--fp16`` (no sharded gradient scaler) stops the run.
"""

from __future__ import annotations

import json
import os

__all__ = ["EngineError", "check_engine", "load_deepspeed_config", "load_fsdp_config", "fsdp_engine_options",
           "CONFIGS_DIR"]

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# The keys transformers' TrainingArguments documents for ``fsdp_config`` (FSDP2).
FSDP_KEYS = {"version", "reshard_after_forward", "cpu_offload", "activation_checkpointing", "cpu_ram_efficient_loading",
             "state_dict_type", "auto_wrap_policy", "transformer_layer_cls_to_wrap", "min_num_params"}
DEEPSPEED_KEYS = {"bf16", "fp16", "zero_optimization", "gradient_accumulation_steps", "gradient_clipping",
                  "train_batch_size", "train_micro_batch_size_per_gpu", "steps_per_print", "wall_clock_breakdown",
                  "optimizer", "scheduler", "zero_allow_untested_optimizer", "activation_checkpointing"}
ZERO_KEYS = {"stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
             "allgather_bucket_size", "allgather_partitions", "sub_group_size", "stage3_prefetch_bucket_size",
             "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
             "stage3_gather_16bit_weights_on_model_save", "offload_optimizer", "offload_param"}


# The launcher's settings, read once: transformers' TrainingArguments sets ACCELERATE_USE_DEEPSPEED in this
# process for --deepspeed, which a later run of the same process must not take for accelerate launch's.
LAUNCH_ENVIRON = {k: os.environ[k] for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED") if k in os.environ}


class EngineError(ValueError):
    """An engine option that cannot run as asked; the message says why and what to use."""


def check_engine(*, fsdp: bool, deepspeed: str | None, fp16: bool = False, load_in_4bit: bool = False,
                 environ=None) -> None:
    """Raise ``EngineError`` for a combination that would not run as asked (module docstring).
    ``environ`` (default ``LAUNCH_ENVIRON``, the launcher's): an ``accelerate launch`` with an FSDP or
    DeepSpeed config would hand the sharding to accelerate (which keeps DDP on CPU processes):
    refused, the engine options of ``healthgpt train`` choose it."""
    environ = LAUNCH_ENVIRON if environ is None else environ
    for engine, flag in (("FSDP", "--fsdp"), ("DEEPSPEED", "--deepspeed configs/zero2.json or zero3.json")):
        if environ.get(f"ACCELERATE_USE_{engine}", "false").lower() in ("1", "true"):
            raise EngineError(f"launched by accelerate with a {engine.lower()} config: healthgpt train shards the model "
                              f"itself; launch with configs/accelerate_multinode.yaml (or torchrun) and pass {flag}")
    if fsdp and deepspeed:
        raise EngineError("--fsdp and --deepspeed are two sharding engines: pass one")
    if fsdp and fp16:
        raise EngineError("--fsdp with --fp16: the FSDP engine has no sharded gradient scaler, so fp16 gradients could "
                          "underflow; use --bf16 (bf16 compute, fp32 master weights)")
    stage = load_deepspeed_config(deepspeed)["zero_optimization"]["stage"] if deepspeed else None
    if stage == 3 and load_in_4bit:
        raise EngineError("--deepspeed with ZeRO-3 and --load-in-4bit: ZeRO-3 partitions every parameter, which "
                          "bitsandbytes 4-bit weights cannot be (transformers builds a quantized model outside zero.Init); "
                          "drop --load-in-4bit (stage 3 of M3 and L14 fits one 80 GB GPU in bf16: "
                          "healthgpt/training/configs/README.md) or use ZeRO-2")


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise EngineError(f"{what} {path}: no such file (examples in {CONFIGS_DIR})")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise EngineError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EngineError(f"{what} {path} must hold a JSON object")
    return data


def load_deepspeed_config(path: str) -> dict:
    """A ZeRO-2/3 config as the Trainer will receive it, checked: known keys only, a ZeRO stage of 2
    or 3, the batch geometry left ``"auto"`` (``--global-batch-size`` sets it), and ZeRO-3 gathering
    16-bit weights for the final save."""
    data = _read_json(path, "DeepSpeed config")
    unknown = sorted(set(data) - DEEPSPEED_KEYS)
    zero = data.get("zero_optimization")
    if unknown:
        raise EngineError(f"DeepSpeed config {path}: unknown keys {unknown}")
    if not isinstance(zero, dict) or zero.get("stage") not in (2, 3):
        raise EngineError(f"DeepSpeed config {path}: zero_optimization.stage must be 2 or 3")
    unknown = sorted(set(zero) - ZERO_KEYS)
    if unknown:
        raise EngineError(f"DeepSpeed config {path}: unknown zero_optimization keys {unknown}")
    fixed = [k for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
             if data.get(k, "auto") != "auto"]
    if fixed:
        raise EngineError(f"DeepSpeed config {path}: leave {fixed} as \"auto\" (the run's batch geometry fills them)")
    if zero["stage"] == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise EngineError(f"DeepSpeed config {path}: ZeRO-3 needs stage3_gather_16bit_weights_on_model_save: true")
    return data


def load_fsdp_config(path: str) -> dict:
    """An FSDP2 ``fsdp_config`` for the Trainer, checked: known keys only, version 2, layer classes named."""
    data = _read_json(path, "FSDP config")
    unknown = sorted(set(data) - FSDP_KEYS)
    if unknown:
        raise EngineError(f"FSDP config {path}: unknown keys {unknown} (known: {sorted(FSDP_KEYS)})")
    if data.get("version", 2) != 2:
        raise EngineError(f"FSDP config {path}: version must be 2 (FSDP2)")
    layers = data.get("transformer_layer_cls_to_wrap")
    if not layers or not all(isinstance(c, str) for c in layers):
        raise EngineError(f"FSDP config {path}: transformer_layer_cls_to_wrap must list layer class names")
    return data


# fsdp.json values the engine implements; anything else is refused rather than ignored.
_FSDP_FIXED = {"version": 2, "cpu_offload": False, "activation_checkpointing": False, "cpu_ram_efficient_loading": False,
               "state_dict_type": "SHARDED_STATE_DICT", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
_FSDP_WHY = {
    "cpu_offload": "the engine keeps parameters on the training device",
    "activation_checkpointing": "use --gradient-checkpointing (the model's own checkpointing, which works under FSDP)",
    "cpu_ram_efficient_loading": "every rank builds the model, then shards it",
    "state_dict_type": "checkpoints are sharded (torch.distributed.checkpoint), the final model is gathered",
    "auto_wrap_policy": "one unit per transformer_layer_cls_to_wrap layer",
    "min_num_params": "units are the transformer_layer_cls_to_wrap layers",
}


def fsdp_engine_options(config: dict) -> dict:
    """``healthgpt.training.fsdp.shard_model`` keyword arguments from a checked ``fsdp_config``
    (``load_fsdp_config``): ``units`` and ``reshard_after_forward``. A value the engine does not
    implement is an ``EngineError`` naming it and why."""
    for key, value in config.items():
        if key == "min_num_params" or (key in _FSDP_FIXED and value != _FSDP_FIXED[key]):
            raise EngineError(f"FSDP config: {key}={value!r} is not supported by the FSDP engine ({_FSDP_WHY.get(key, 'FSDP2 only')})")
    reshard = config.get("reshard_after_forward", True)
    if not isinstance(reshard, bool):
        raise EngineError(f"FSDP config: reshard_after_forward must be true or false, got {reshard!r}")
    return {"units": tuple(config["transformer_layer_cls_to_wrap"]), "reshard_after_forward": reshard}
