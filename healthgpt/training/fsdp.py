"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) for HealthGPT, on GPUs (NCCL) and CPUs (gloo).

Units: one per Phi-3 decoder layer and per CLIP encoder layer (``SHARD_UNITS``), then the root
(embeddings, lm_head, projectors, the CLIP embeddings, the image tokenizer). A decoder layer's
unit holds its frozen base weights and both H-LoRA plugins together: every parameter is a
``DTensor`` sharded on dim 0 over the ranks, so each rank keeps about 1/N of every unit's storage,
frozen or trainable; the forward all-gathers one unit at a time and frees it after use. Per-sample
routing (``hlora.set_task``) is layer state, not a parameter, so it is unchanged by sharding and
is still there when activation checkpointing recomputes a layer in the backward. A rank whose
micro-batch holds one task only leaves the other task's plugin and projector without gradients:
every unit reduce-scatters zeros for its unused parameters (``set_reduce_scatter_unused_params``,
FSDP2's ``find_unused_parameters``), else the ranks' reduce-scatters differ in size (gloo aborts
with "Received data size doesn't match expected size"; NCCL hangs).

Mixed precision (``mixed_precision="bf16"``): the sharded parameters stay float32 (the optimizer's
master weights), each unit is all-gathered and computed in bfloat16, gradients are reduced in
float32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).

Checkpoints: ``save_sharded``/``load_sharded`` write and read the trainable parameters and the
optimizer state with ``torch.distributed.checkpoint`` (each rank its own shards; a later run may
use another number of ranks). ``gather_state_dict`` gathers the full model to rank 0 for a normal
``HealthGPT.save_pretrained``.

accelerate 1.15 does not run its FSDP plugin on CPU processes (``MULTI_CPU`` keeps DDP), so the
model is sharded here, before the Trainer sees it; ``require_fsdp`` stops with a clear error where
FSDP2 cannot run instead of letting anything train as something else.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["SHARD_UNITS", "FSDPError", "require_fsdp", "shard_model", "is_sharded", "shard_sizes", "gather_state_dict",
           "save_sharded", "load_sharded"]

SHARD_UNITS = ("Phi3DecoderLayer", "CLIPEncoderLayer")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDPError(RuntimeError):
    """FSDP cannot run as asked here; the message says why."""


def require_fsdp() -> None:
    """Stop unless FSDP2 can shard in this process: torch with ``fully_shard`` (and its reduction of
    unused parameters' gradients) and an initialised process group of more than one rank."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError as e:
        raise FSDPError(f"--fsdp needs PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6): {e}") from None
    if not hasattr(FSDPModule, "set_reduce_scatter_unused_params"):
        raise FSDPError("--fsdp needs FSDP2's set_reduce_scatter_unused_params (a newer torch): a rank whose batch holds "
                        "one task leaves the other plugin without gradients, which FSDP2 can only reduce with it")
    if not dist.is_available():
        raise FSDPError("--fsdp: this PyTorch build has no torch.distributed")
    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise FSDPError("--fsdp shards over processes: launch with torchrun --nproc_per_node N (N >= 2) "
                        "or accelerate launch; a single process has nothing to shard over")


def shard_model(model: nn.Module, mixed_precision: str | None = None, units=SHARD_UNITS,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard``: one unit per module whose class name is in
    ``units``, then the root. ``mixed_precision``: None (compute in the parameters' dtype), ``"bf16"``
    or ``"fp16"``. Returns ``model`` (its class becomes ``FSDP<class>``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    require_fsdp()
    if mixed_precision is not None and mixed_precision not in _DTYPES:
        raise ValueError(f"mixed_precision must be None, 'bf16' or 'fp16', got {mixed_precision!r}")
    layers = [m for m in model.modules() if type(m).__name__ in units]
    if not layers:
        raise FSDPError(f"no module of the classes {list(units)} to shard in {type(model).__name__}")
    policy = MixedPrecisionPolicy(param_dtype=_DTYPES[mixed_precision], reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    model.set_reduce_scatter_unused_params(True)  # recurses into every unit (module docstring)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_sizes(model: nn.Module) -> dict:
    """``{"local": elements this rank stores, "full": elements of the whole model}`` over the
    sharded (DTensor) parameters, and ``"unsharded"``: elements of parameters left whole."""
    from torch.distributed.tensor import DTensor

    local = full = whole = 0
    for p in model.parameters():
        if isinstance(p, DTensor):
            local += p.to_local().numel()
            full += p.numel()
        else:
            whole += p.numel()
    return {"local": local, "full": full, "unsharded": whole}


def gather_state_dict(model: nn.Module) -> dict:
    """The full (unsharded) state dict on rank 0, on the CPU; ``{}`` on the other ranks. Collective:
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _trainable_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in model_state.items() if k in trainable}, "optimizer": optim_state}


def save_sharded(model: nn.Module, optimizer, directory: str) -> str:
    """Write the trainable parameters and the optimizer state of a sharded model to ``directory``
    (each rank its shards), through a staging folder renamed into place once every rank is done, so
    a killed save never leaves a half-written ``directory``. Collective."""
    import torch.distributed.checkpoint as dcp

    staging = directory.rstrip(os.sep) + ".staging"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    dcp.save(_trainable_state(model, optimizer), checkpoint_id=staging)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(staging, directory)
    dist.barrier()
    return directory


def load_sharded(model: nn.Module, optimizer, directory: str) -> None:
    """Read what ``save_sharded`` wrote into a model sharded like (or unlike) the one that wrote it.
    The frozen parameters are the run's starting point and are not read. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no sharded checkpoint at {directory}")
    state = _trainable_state(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
