"""Copying tensors read from a file into a model's tensors: everything checked first, then copied.

One rule for every loader (hlora checkpoints, PEFT adapters, healthgpt weights, trainer resume):
a file that does not fit changes nothing, and the error names the keys at fault.
"""

from __future__ import annotations

import torch

from .zero3 import full_shape, gathered

__all__ = ["CheckpointError", "copy_checked"]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the keys."""


def _dtypes_compatible(file_dtype: torch.dtype, model_dtype: torch.dtype) -> bool:
    """Floating point casts to floating point (a bf16 release into an fp32 model); anything else
    (integer, bool, complex) must match exactly, since a cast would change its meaning."""
    if file_dtype.is_floating_point and model_dtype.is_floating_point:
        return True
    return file_dtype == model_dtype


def _view_id(t: torch.Tensor) -> tuple:
    """Identifies one memory region: two keys with the same id are the same (tied) tensor."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _listing(items: list, most: int = 10) -> str:
    return ", ".join(items[:most]) + (f" (+{len(items) - most} more)" if len(items) > most else "")


@torch.no_grad()
def copy_checked(targets: dict, tensors: dict, *, what: str, strict: bool = True) -> None:
    """Copy ``tensors`` (name -> tensor read from a file) into ``targets`` (name -> the model's
    tensor, written in place), or raise ``CheckpointError`` before copying anything.

    Checked for every key first: missing keys (in ``targets``, not in ``tensors``), unexpected keys
    (the reverse), shapes, dtypes (floating point casts to floating point; other dtypes must be
    equal), NaN/Inf values (never a weight: a file holding them is damaged), and tied targets (two
    names for one tensor) whose file values differ. ``strict=False`` tolerates missing and
    unexpected keys, never the rest. The error reads
    ``cannot load {what}: missing keys (n): a, b | shape mismatch (n): k: file (..) vs model (..)``.
    """
    common = [k for k in targets if k in tensors]
    missing = sorted(k for k in targets if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in targets)
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(full_shape(targets[k]))}"
              for k in sorted(common) if tuple(tensors[k].shape) != tuple(full_shape(targets[k]))]
    dtypes = [f"{k}: file {tensors[k].dtype} vs model {targets[k].dtype}"
              for k in sorted(common) if not _dtypes_compatible(tensors[k].dtype, targets[k].dtype)]
    tied = {}
    for k in common:
        if targets[k].numel():
            tied.setdefault(_view_id(targets[k]), []).append(k)
    nonfinite = [f"{k} ({int((~torch.isfinite(tensors[k])).sum())} of {tensors[k].numel()})" for k in sorted(tensors)
                 if (tensors[k].is_floating_point() or tensors[k].is_complex()) and not bool(torch.isfinite(tensors[k]).all())]
    untied = [" = ".join(sorted(keys)) for keys in tied.values()
              if len(keys) > 1 and not all(torch.equal(tensors[keys[0]], tensors[k]) for k in keys[1:])]
    problems = [f"{label} ({len(items)}): {_listing(items)}" for label, items in (
        ("missing keys", missing if strict else []),
        ("unexpected keys", unexpected if strict else []),
        ("shape mismatch", shapes),
        ("dtype mismatch", dtypes),
        ("NaN/Inf values", nonfinite),
        ("tied in the model but different in the file", sorted(untied)),
    ) if items]
    if problems:
        raise CheckpointError(f"cannot load {what}: " + " | ".join(problems))
    for k in common:
        with gathered([targets[k]], write=True):  # one at a time: a ZeRO-3 parameter is a slice per process
            targets[k].copy_(tensors[k])
