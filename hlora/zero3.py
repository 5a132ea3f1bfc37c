"""DeepSpeed ZeRO-3 parameters: the few places that read or write a whole weight ask here.

ZeRO-3 partitions every parameter over the processes: each holds a slice (``p.ds_tensor``) and the
``Parameter`` itself is empty (shape ``[0]``; the real shape is ``p.ds_shape``) except while
DeepSpeed has gathered it, which it does around the forward (and backward) of the module owning it.
A model built under ``deepspeed.zero.Init`` (what transformers does when the HF Trainer's DeepSpeed
config says ZeRO-3) is partitioned from construction; ``deepspeed.initialize`` partitions the rest.

``deepspeed`` is imported only when a partitioned parameter is met: hlora does not depend on it
(an optional extra), and importing it is slow and starts its accelerator detection.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["is_partitioned", "full_shape", "gathered", "register_external", "unregister_external"]


def is_partitioned(t: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (whole or not at the moment)."""
    return hasattr(t, "ds_id")


def full_shape(t: torch.Tensor) -> torch.Size:
    """The tensor's shape, a ZeRO-3 parameter's whole shape (``ds_shape``) rather than its ``[0]``."""
    return getattr(t, "ds_shape", t.shape)


def _zero():
    """``deepspeed.runtime.zero.partition_parameters`` (``deepspeed.zero`` re-exports all but
    ``unregister_external_parameter``)."""
    import deepspeed.runtime.zero.partition_parameters as zero  # optional (module docstring): partitioned parameters only

    return zero


def gathered(params, write: bool = False):
    """A context in which the ZeRO-3 parameters among ``params`` are whole on every process;
    ``write=True``: what rank 0 writes into them is partitioned back to every process on exit (every
    process must enter it: it is a collective). A no-op context when none is partitioned."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    return _zero().GatheredParameters(params, modifier_rank=0 if write else None)


def register_external(module: nn.Module, params) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward; ``params`` (owned by submodules
    that never run) are read directly by ``module``'s forward: gather them with it (idempotent)."""
    for p in params:
        _zero().register_external_parameter(module, p)


def unregister_external(module: nn.Module, params) -> None:
    """Undo ``register_external`` for those of ``params`` that were registered."""
    registered = dict(module.ds_external_parameters()) if hasattr(module, "ds_external_parameters") else {}
    for p in params:
        if id(p) in registered:
            _zero().unregister_external_parameter(module, p)
