"""``fused_hlora_linear``: the H-LoRA layer as two ``torch.library`` custom ops and their autograd.

- ``hlora::fused_fwd`` (x, weight, bias, A, B, router, token_plugin, ranks, experts, scales, dropouts, seed)
  -> (y [T, N], UL [T, R + K] float32, saved for the backward)
- ``hlora::fused_bwd`` (dy, x, weight, A, B, router, token_plugin, UL, ..., need_dx, need_dw)
  -> (dx [T, D], dB [N, R] float32, d[A; router] [R + K, D] float32); gradients that are not
  needed come back as empty tensors.

Both have fake (meta) implementations, so ``torch.compile`` sees each as one opaque op, and the
forward's autograd formula calls the backward op. The Triton code lives in ``fused_linear.py``
and is imported on the first call: under ``TRITON_INTERPRET=1`` the interpreter must be chosen
before the kernels are defined, and importing ``hlora.kernels`` should not need Triton at all.

The public ``fused_hlora_linear`` follows ``hlora.functional.hlora_linear``'s contract. It takes
the reference torch path (``_torch_hlora_linear``) instead in two cases: x in a dtype other than
float16 / bfloat16 / float32, and a base ``weight`` or ``bias`` that requires grad (the kernels
never produce gradients for the frozen base layer; a warning says so once). CPU tensors run the
kernels only under ``TRITON_INTERPRET=1``; without it the first call raises.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional, Sequence

import torch

__all__ = ["fused_hlora_linear"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    """The Triton module, imported (and its kernels defined) on first use."""
    return importlib.import_module(".fused_linear", __package__)


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("hlora::fused_fwd", mutates_args=())
def fused_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    router: torch.Tensor,
    token_plugin: Optional[torch.Tensor],
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    dropouts: Sequence[float],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _kernels()
    return k.hlora_forward(
        x, weight, bias, A, B, router, token_plugin, tuple(ranks), tuple(experts), tuple(scales), tuple(dropouts), seed
    )


@fused_fwd.register_fake
def _(x, weight, bias, A, B, router, token_plugin, ranks, experts, scales, dropouts, seed):
    T = x.shape[0]
    return x.new_empty((T, weight.shape[0])), x.new_empty((T, A.shape[0] + router.shape[0]), dtype=torch.float32)


@torch.library.custom_op("hlora::fused_bwd", mutates_args=())
def fused_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    router: torch.Tensor,
    token_plugin: Optional[torch.Tensor],
    ul: torch.Tensor,
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    dropouts: Sequence[float],
    seed: int,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _kernels()
    dx, dB, dw_cat = k.hlora_backward(
        dy, x, weight, A, B, router, token_plugin, ul, tuple(ranks), tuple(experts), tuple(scales), tuple(dropouts), seed,
        need_dx, need_dw,
    )
    if not need_dx:
        dx = x.new_empty(0)
    if not need_dw:
        dB, dw_cat = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return dx, dB, dw_cat


@fused_bwd.register_fake
def _(dy, x, weight, A, B, router, token_plugin, ul, ranks, experts, scales, dropouts, seed, need_dx, need_dw):
    dx = x.new_empty(x.shape if need_dx else (0,))
    dB = x.new_empty(tuple(B.shape) if need_dw else (0,), dtype=torch.float32)
    dw_cat = x.new_empty((A.shape[0] + router.shape[0], A.shape[1]) if need_dw else (0,), dtype=torch.float32)
    return dx, dB, dw_cat


# ----------------------------------------------------------------------------------------------
# autograd: saves x, UL and the seed (no mask, nothing of width d_out); no grads for weight/bias
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, router, token_plugin, ranks, experts, scales, dropouts, seed = inputs
    _, ul = output
    ctx.mark_non_differentiable(ul)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, A, B, router, token_plugin, ul)
    ctx.hparams = (tuple(ranks), tuple(experts), tuple(scales), tuple(dropouts), int(seed))


def _backward(ctx, dy, _dul):
    x, weight, A, B, router, token_plugin, ul = ctx.saved_tensors
    ranks, experts, scales, dropouts, seed = ctx.hparams
    n = ctx.needs_input_grad
    need_dx, need_dw = bool(n[0]), bool(n[3] or n[4] or n[5])
    if dy is None or not (need_dx or need_dw):
        return (None,) * 12
    dx, dB, dw_cat = fused_bwd(
        dy, x, weight, A, B, router, token_plugin, ul, ranks, experts, scales, dropouts, seed, need_dx, need_dw
    )
    R = A.shape[0]
    dA = dw_cat[:R].to(A.dtype) if need_dw else None
    drouter = dw_cat[R:].to(router.dtype) if need_dw else None
    dB = dB.to(B.dtype) if need_dw else None
    return (dx if need_dx else None), None, None, dA, dB, drouter, None, None, None, None, None, None


fused_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------

_warned_frozen = False


def _needs_reference(x, weight, bias) -> bool:
    global _warned_frozen
    if x.dtype not in _KERNEL_DTYPES:
        return True
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        if not _warned_frozen:
            warnings.warn(
                "hlora.kernels: the base weight/bias requires grad, but the fused kernels treat the base "
                "layer as frozen; using the torch reference path for such layers.",
                stacklevel=3,
            )
            _warned_frozen = True
        return True
    return False


def fused_hlora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    router: torch.Tensor,
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    token_plugin: Optional[torch.Tensor] = None,
    dropout: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Fused H-LoRA linear (see ``hlora.functional.hlora_linear``). ``dropout``: one probability for
    all plugins or one per plugin, applied whenever > 0 (the caller passes 0 in eval).

    Output dtype is x.dtype (under autocast: the autocast dtype, as ``F.linear`` would give).
    A / B / router may be float32 while x is half precision: they are rounded to x's dtype tile by
    tile, like the reference's ``.to(x.dtype)``, and their gradients come back in their own dtype.
    Dropout draws one seed from torch's default generator per call, so ``torch.manual_seed`` and
    checkpointing's RNG restore reproduce the mask.
    """
    ranks = tuple(int(r) for r in ranks)
    experts = tuple(int(k) for k in experts)
    scales = tuple(float(s) for s in scales)
    dropouts = (float(dropout),) * len(ranks) if isinstance(dropout, (int, float)) else tuple(float(p) for p in dropout)
    if len(dropouts) != len(ranks) or not all(0.0 <= p < 1.0 for p in dropouts):
        raise ValueError(f"dropout must be one probability in [0, 1) or one per plugin, got {dropout!r}")
    if torch.is_autocast_enabled(x.device.type) and x.dtype in _KERNEL_DTYPES:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if _needs_reference(x, weight, bias):
        from hlora.functional import _torch_hlora_linear

        return _torch_hlora_linear(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropouts)
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in)
    tp = None if token_plugin is None else token_plugin.reshape(-1).to(device=x.device, dtype=torch.int32)
    seed = int(torch.randint(2**31, (1,)).item()) if max(dropouts) > 0 else 0
    y, _ = fused_fwd(x2, weight, bias, A, B, router, tp, ranks, experts, scales, dropouts, seed)
    return y.view(*lead, weight.shape[0])
