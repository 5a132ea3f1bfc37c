"""The H-LoRA layer as two ``torch.library`` custom ops and their autograd, and the public entries.

- ``hlora::fused_fwd`` (x, weight, bias, y_base, A, B, router, token_plugin, ranks, experts, scales,
  dropouts, seed) -> (y [T, N], UL [T, R + K] float32, h [T, R] x.dtype), the last two saved for
  the backward, as views of buffers with rows padded to a multiple of 16 elements. The base is ``weight`` (+ ``bias``), or ``y_base``: its output, computed
  by the caller (any module: the adapter is added into it).
- ``hlora::fused_bwd`` (dy, x, weight, A, B, router, token_plugin, UL, h, ..., need_dx, need_dw)
  -> (dx [T, D], dA, dB, drouter in their parameters' dtypes); gradients that are not needed come
  back as empty tensors. With ``weight`` None, dx is the adapter's part only.

Both have fake (meta) implementations, so ``torch.compile`` sees each as one opaque op, and the
forward's autograd formula calls the backward op. The Triton code lives in ``fused_linear.py``
and is imported on the first call: under ``TRITON_INTERPRET=1`` the interpreter must be chosen
before the kernels are defined, and importing ``hlora.kernels`` should not need Triton at all.

``fused_hlora_linear`` is the kernels' entry for ``hlora.functional.hlora_linear``, which alone
chooses the backend and normalises the arguments; ``hlora_adapter_add`` adds the adapter into the
output of any base (a quantized linear, say). CPU tensors run the kernels only under
``TRITON_INTERPRET=1``; without it the first call raises.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

__all__ = ["fused_hlora_linear", "grouped_hlora_linear", "hlora_adapter_add"]

_ALIGN = 16  # rank-space rows are padded to a multiple of this many elements (fused_linear.RANK_ALIGN)


def _kernels():
    """The Triton module, imported (and its kernels defined) on first use."""
    return importlib.import_module(".fused_linear", __package__)


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("hlora::fused_fwd", mutates_args=())
def fused_fwd(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    y_base: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    router: torch.Tensor,
    token_plugin: Optional[torch.Tensor],
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    dropouts: Sequence[float],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().hlora_forward(
        x, weight, bias, y_base, A, B, router, token_plugin, tuple(ranks), tuple(experts), tuple(scales),
        tuple(dropouts), seed,
    )


@fused_fwd.register_fake
def _(x, weight, bias, y_base, A, B, router, token_plugin, ranks, experts, scales, dropouts, seed):
    T, R, K = x.shape[0], A.shape[0], router.shape[0]
    return (
        x.new_empty((T, B.shape[0])),
        x.new_empty((T, _padded(R + K)), dtype=torch.float32)[:, : R + K],
        x.new_empty((T, _padded(R)))[:, :R],
    )


@torch.library.custom_op("hlora::fused_bwd", mutates_args=())
def fused_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    router: torch.Tensor,
    token_plugin: Optional[torch.Tensor],
    ul: torch.Tensor,
    h: torch.Tensor,
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    dropouts: Sequence[float],
    seed: int,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dA, dB, drouter = _kernels().hlora_backward(
        dy, x, weight, A, B, router, token_plugin, ul, h, tuple(ranks), tuple(experts), tuple(scales),
        tuple(dropouts), seed, need_dx, need_dw,
    )
    if not need_dx:
        dx = x.new_empty(0)
    if not need_dw:
        dA, dB, drouter = A.new_empty(0), B.new_empty(0), router.new_empty(0)
    return dx, dA, dB, drouter


@fused_bwd.register_fake
def _(dy, x, weight, A, B, router, token_plugin, ul, h, ranks, experts, scales, dropouts, seed, need_dx, need_dw):
    dx = x.new_empty(x.shape if need_dx else (0,))
    if not need_dw:
        return dx, A.new_empty(0), B.new_empty(0), router.new_empty(0)
    return dx, torch.empty_like(A), torch.empty_like(B), torch.empty_like(router)


# ----------------------------------------------------------------------------------------------
# autograd: saves x, UL and h (nothing of width d_out, no mask); no grads for weight / bias
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, weight, bias, y_base, A, B, router, token_plugin, ranks, experts, scales, dropouts, seed = inputs
    _, ul, h = output
    ctx.mark_non_differentiable(ul, h)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, A, B, router, token_plugin, ul, h)
    ctx.hparams = (tuple(ranks), tuple(experts), tuple(scales), tuple(dropouts), int(seed))


def _backward(ctx, dy, _dul, _dh):
    x, weight, A, B, router, token_plugin, ul, h = ctx.saved_tensors
    ranks, experts, scales, dropouts, seed = ctx.hparams
    n = ctx.needs_input_grad
    need_dx, need_dw = bool(n[0]), bool(n[4] or n[5] or n[6])
    dy_base = dy if n[3] else None
    if dy is None or not (need_dx or need_dw):
        return (None, None, None, dy_base) + (None,) * 9
    dx, dA, dB, drouter = fused_bwd(
        dy, x, weight, A, B, router, token_plugin, ul, h, ranks, experts, scales, dropouts, seed, need_dx, need_dw
    )
    grads = (dA, dB, drouter) if need_dw else (None, None, None)
    return (dx if need_dx else None), None, None, dy_base, *grads, None, None, None, None, None, None


fused_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# grouped plugins: per-plugin tensors and the routing's sort permutation (mixed batches)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("hlora::grouped_fwd", mutates_args=())
def grouped_fwd(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    y_base: Optional[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    routers: list[torch.Tensor],
    order: torch.Tensor,
    counts: Sequence[int],
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    dropouts: Sequence[float],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().grouped_forward(
        x, weight, bias, y_base, list(As), list(Bs), list(routers), order, tuple(counts), tuple(ranks),
        tuple(experts), tuple(scales), tuple(dropouts), seed,
    )


@grouped_fwd.register_fake
def _(x, weight, bias, y_base, As, Bs, routers, order, counts, ranks, experts, scales, dropouts, seed):
    Tr, width, r_width = sum(counts), max(r + k for r, k in zip(ranks, experts)), max(ranks)
    return (
        x.new_empty((x.shape[0], Bs[0].shape[0])),
        x.new_empty((Tr, _padded(width)), dtype=torch.float32)[:, :width],
        x.new_empty((Tr, _padded(r_width)))[:, :r_width],
    )


@torch.library.custom_op("hlora::grouped_bwd", mutates_args=())
def grouped_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    routers: list[torch.Tensor],
    order: torch.Tensor,
    counts: Sequence[int],
    ul: torch.Tensor,
    h: torch.Tensor,
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    dropouts: Sequence[float],
    seed: int,
    need_dx: bool,
    need_dw: bool,
) -> list[torch.Tensor]:
    """-> [dx, dA_0.., dB_0.., drouter_0..] (empty tensors for what is not needed)."""
    dx, dAs, dBs, drouters = _kernels().grouped_backward(
        dy, x, weight, list(As), list(Bs), list(routers), order, tuple(counts), ul, h, tuple(ranks), tuple(experts),
        tuple(scales), tuple(dropouts), seed, need_dx, need_dw,
    )
    if not need_dx:
        dx = x.new_empty(0)
    if not need_dw:
        dAs, dBs, drouters = ([t.new_empty(0) for t in ts] for ts in (As, Bs, routers))
    return [dx, *dAs, *dBs, *drouters]


@grouped_bwd.register_fake
def _(dy, x, weight, As, Bs, routers, order, counts, ul, h, ranks, experts, scales, dropouts, seed, need_dx, need_dw):
    dx = x.new_empty(x.shape if need_dx else (0,))
    grads = [torch.empty_like(t) if need_dw else t.new_empty(0) for ts in (As, Bs, routers) for t in ts]
    return [dx, *grads]


def _grouped_setup_context(ctx, inputs, output):
    x, weight, bias, y_base, As, Bs, routers, order, counts, ranks, experts, scales, dropouts, seed = inputs
    _, ul, h = output
    ctx.mark_non_differentiable(ul, h)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, order, ul, h, *As, *Bs, *routers)
    ctx.hparams = (tuple(counts), tuple(ranks), tuple(experts), tuple(scales), tuple(dropouts), int(seed))


def _grouped_backward(ctx, dy, _dul, _dh):
    counts, ranks, experts, scales, dropouts, seed = ctx.hparams
    P = len(ranks)
    x, weight, order, ul, h, *params = ctx.saved_tensors
    As, Bs, routers = params[:P], params[P : 2 * P], params[2 * P :]
    n = ctx.needs_input_grad
    need_dx, need_dw = bool(n[0]), any(bool(v) for v in n[4:7])
    dy_base = dy if n[3] else None
    if dy is None or not (need_dx or need_dw):
        return (None, None, None, dy_base) + (None,) * 10
    dx, *grads = grouped_bwd(dy, x, weight, As, Bs, routers, order, counts, ul, h, ranks, experts, scales, dropouts,
                             seed, need_dx, need_dw)
    lists = [grads[:P], grads[P : 2 * P], grads[2 * P :]] if need_dw else [None, None, None]
    return (dx if need_dx else None), None, None, dy_base, *lists, None, None, None, None, None, None, None


grouped_fwd.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def _seed(dropouts) -> int:
    """One seed per call from torch's default generator, so ``torch.manual_seed`` and
    checkpointing's RNG restore reproduce the dropout mask."""
    return int(torch.randint(2**31, (1,)).item()) if max(dropouts) > 0 else 0


def fused_hlora_linear(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropouts) -> torch.Tensor:
    """Fused H-LoRA linear on arguments as ``hlora.functional.hlora_linear`` checked and normalised
    them: x [T, d_in] in float16 / bfloat16 / float32 (already in the autocast dtype), tuples of
    ints / floats, token_plugin int32 [T] or None, one dropout probability per plugin (0 in eval).
    ``weight``: the frozen base weight [d_out, d_in] (with ``bias``), or a callable base module,
    whose own forward (and autograd) computes the base part. Returns y [T, d_out] in x.dtype.

    A / B / router may be float32 while x is half precision: they are rounded to x's dtype tile by
    tile, like the reference's ``.to(x.dtype)``, and their gradients come back in their own dtype.
    """
    if callable(weight):
        return hlora_adapter_add(weight(x), x, A, B, router, ranks, experts, scales, token_plugin, dropouts)
    y, _, _ = fused_fwd(x, weight, bias, None, A, B, router, token_plugin, ranks, experts, scales, dropouts,
                        _seed(dropouts))
    return y


def hlora_adapter_add(y_base, x, A, B, router, ranks, experts, scales, token_plugin=None, dropouts=None):
    """``y_base + delta``: the H-LoRA adapter's output (``hlora.kernels.reference.adapter_delta``)
    accumulated into the output of any base layer, ``y_base`` [T, d_out] (its gradient is dy; the
    base's own autograd handles its dx). x [T, d_in]; other arguments as ``fused_hlora_linear``
    (``dropouts`` None: no dropout)."""
    dropouts = tuple(dropouts) if dropouts is not None else (0.0,) * len(ranks)
    if y_base.shape != (x.shape[0], B.shape[0]):
        raise ValueError(f"the base output has shape {tuple(y_base.shape)}, expected [{x.shape[0]}, {B.shape[0]}]")
    y, _, _ = fused_fwd(x, None, None, y_base.to(x.dtype), A, B, router, token_plugin, tuple(ranks), tuple(experts),
                        tuple(scales), dropouts, _seed(dropouts))
    return y


def grouped_hlora_linear(x, weight, bias, As, Bs, routers, ranks, experts, scales, order, counts, dropouts):
    """``fused_hlora_linear`` for a mixed batch with each plugin's tensors separate (``As`` / ``Bs`` /
    ``routers``: one per plugin, read where they live) and its tokens grouped: ``order`` int32 [T],
    the tokens sorted by plugin (unrouted last), ``counts`` the tokens of each plugin (host ints).
    Each plugin's rank GEMMs run on its own tokens only; unrouted tokens get the base output.
    ``weight`` may be a callable base module, as in ``fused_hlora_linear``."""
    seed = _seed(dropouts)
    if callable(weight):
        y_base = weight(x)
        if y_base.shape != (x.shape[0], Bs[0].shape[0]):
            raise ValueError(f"the base output has shape {tuple(y_base.shape)}, expected [{x.shape[0]}, {Bs[0].shape[0]}]")
        weight, y_base = None, y_base.to(x.dtype)
    else:
        y_base = None
    y, _, _ = grouped_fwd(x, weight, bias, y_base, list(As), list(Bs), list(routers), order, tuple(counts),
                          tuple(ranks), tuple(experts), tuple(scales), tuple(dropouts), seed)
    return y
