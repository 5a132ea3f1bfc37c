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

``fused_hlora_linear`` is the kernels' entry for ``hlora.functional.hlora_linear``, which alone
chooses the backend and normalises the arguments. CPU tensors run the kernels only under
``TRITON_INTERPRET=1``; without it the first call raises.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

__all__ = ["fused_hlora_linear"]

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


def fused_hlora_linear(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropouts) -> torch.Tensor:
    """Fused H-LoRA linear on arguments as ``hlora.functional.hlora_linear`` checked and normalised
    them: x [T, d_in] in float16 / bfloat16 / float32 (already in the autocast dtype), tuples of
    ints / floats, token_plugin int32 [T] or None, one dropout probability per plugin (0 in eval).
    Returns y [T, d_out] in x.dtype.

    A / B / router may be float32 while x is half precision: they are rounded to x's dtype tile by
    tile, like the reference's ``.to(x.dtype)``, and their gradients come back in their own dtype.
    Dropout draws one seed from torch's default generator per call, so ``torch.manual_seed`` and
    checkpointing's RNG restore reproduce the mask.
    """
    seed = int(torch.randint(2**31, (1,)).item()) if max(dropouts) > 0 else 0
    y, _ = fused_fwd(x, weight, bias, A, B, router, token_plugin, ranks, experts, scales, dropouts, seed)
    return y
