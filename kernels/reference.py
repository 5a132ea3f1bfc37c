"""The H-LoRA op's reference math and its constants: the one definition every path shares.

Importable without Triton. ``hlora.functional`` (the public op and the torch backend) and the
Triton kernels (``fused_linear.py``: the gate floor) both take them from here; nothing in
``hlora.kernels`` imports ``hlora``.

For tokens ``x`` [T, d_in] and P plugins stacked along the rank axis (plugin p owns ``ranks[p]``
rows of ``A`` / columns of ``B`` and ``experts[p]`` rows of ``router``)::

    g_p   = softmax(router_p @ x)                                  # k_p gate weights per token
    h_p   = dropout(s_p * (A_p @ x)) * repeat_interleave(g_p, r_p)  # r_p = R_p / k_p
    delta = sum_p [token routed to p] * B_p @ h_p                  # adapter_delta
    y     = base(x) + delta                                        # base: W0 x + bias, or any callable
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["GATE_LOG_FLOOR", "router_gates", "rank_space", "GatedUpProjection", "adapter_delta", "hlora_reference"]

# exp(-60) ~ 9e-27: gate weights below this contribute nothing at any float precision we compute
# in, but on a CPU they become subnormal products that slow every later GEMM of the layer ~10x.
GATE_LOG_FLOOR = -60.0


def router_gates(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis, computed in at least float32, with negligible weights flushed
    to exact zeros (logits more than ``-GATE_LOG_FLOOR`` below the row max become -inf first)."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    z = z - z.amax(dim=-1, keepdim=True).detach()
    z = torch.where(z < _FLOOR, _NEG_INF, z)  # 0-d tensors, not Python floats: no scalar wrapping per call
    return torch.softmax(z, dim=-1)


# 0-d CPU tensors: they broadcast to any device and keep z's dtype
_FLOOR, _NEG_INF = torch.tensor(GATE_LOG_FLOOR), torch.tensor(float("-inf"))


def _products(x2, A, router):
    """u = x2 A^T [T, R] and the router logits x2 router^T [T, K]."""
    # two products, not one over torch.cat([A, router]): no copy of the weights per call (the same
    # dot products; a decode step is memory-bound and a CUDA graph would replay the copy every step)
    return torch.mm(x2, _cast(A, x2.dtype).t()), torch.mm(x2, _cast(router, x2.dtype).t())


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when it is one already (a decode step's ops cost their dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def _plugin_parts(u_all, logits_all, ranks, experts, token_plugin, dropouts):
    """Per plugin p: the dropped-out u_p (``native_dropout``: ``F.dropout``'s values and random
    stream), its keep mask (bool, None without dropout) and its gates ``router_gates`` [T, k_p]
    zeroed on the tokens not routed to p."""
    us, gates, masks = [], [], []
    if len(ranks) == 1:  # one plugin: its columns are all of them (a split costs a few us per call)
        splits = [(u_all, logits_all, dropouts[0])]
    else:
        splits = zip(u_all.split(list(ranks), 1), logits_all.split(list(experts), 1), dropouts)
    for p, (u, logits, p_drop) in enumerate(splits):
        g = router_gates(logits)
        if token_plugin is not None:
            g = g * (token_plugin == p).unsqueeze(-1).to(g.dtype)
        mask = None
        if p_drop > 0:
            u, mask = torch.native_dropout(u, p_drop, True)
        us.append(u)
        gates.append(g)
        masks.append(mask)
    return us, gates, masks


def _gated(us, gates, experts, scales) -> torch.Tensor:
    """h [T, R]: each plugin's u_p times its gates (times s_p) repeated over the expert's r_p columns."""
    # dropout(s * u) * g == dropout(u) * (s * g): one pass fewer
    hs = [(u.reshape(-1, k, u.shape[1] // k) * (g * s).to(u.dtype).unsqueeze(-1)).view(-1, u.shape[1])
          for u, g, k, s in zip(us, gates, experts, scales)]
    return hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)


def rank_space(x2, A, router, ranks: Sequence[int], experts: Sequence[int], scales: Sequence[float],
               token_plugin, dropouts: Sequence[float]) -> torch.Tensor:
    """h [T, sum(ranks)] for x2 [T, d_in] in plain torch ops (autograd saves h's intermediates;
    ``adapter_delta`` / ``hlora_reference`` use ``GatedUpProjection`` instead, which does not)."""
    u_all, logits_all = _products(x2, A, router)
    return _gated(*_plugin_parts(u_all, logits_all, ranks, experts, token_plugin, dropouts)[:2], experts, scales)


class GatedUpProjection(torch.autograd.Function):
    """``y + h B^T`` (``h B^T`` when y is None) from u = x A^T [T, R] and the router logits [T, K],
    with h = dropout(s * u) * repeat(g) as in ``rank_space``, saving for the backward only the
    dropped-out u [T, R], the routed gates g [T, K] (float32 at least), the dropout keep masks
    (bool) and B: h is recomputed, so the adapter keeps one [T, R] activation as PEFT LoRA does.

    Backward, per plugin p with k experts of r columns each, M its keep mask and q its dropout::

        dy_in    = dy                                          # to y
        dB       = dy^T h
        dh       = dy B                                        # [T, R]
        dg_e     = s * sum over expert e's r columns of dh * dropout(u)
        dlogits  = g * (dg - sum_e(dg_e * g_e))                # softmax backward; the -60 floor's
                                                               # zeroed (and unrouted) gates get 0
        du       = dh * repeat(s * g) [* M / (1 - q)]

    The products' backward (dA = du^T x, drouter = dlogits^T x, dx = du A + dlogits router) is
    autograd's, outside.
    """

    @staticmethod
    def forward(ctx, y, u_all, logits_all, B, ranks, experts, scales, token_plugin, dropouts):
        us, gates, masks = _plugin_parts(u_all, logits_all, ranks, experts, token_plugin, dropouts)
        h = _gated(us, gates, experts, scales)
        Bt = B.to(h.dtype).t()
        out = h @ Bt if y is None else torch.addmm(y, h, Bt)
        ctx.config = (len(us), tuple(experts), tuple(scales), tuple(dropouts), [m is not None for m in masks],
                      logits_all.dtype, B.dtype, y is not None)
        ctx.save_for_backward(B, *us, *gates, *[m for m in masks if m is not None])
        return out

    @staticmethod
    def backward(ctx, dy):
        P, experts, scales, dropouts, has_mask, logits_dtype, B_dtype, has_y = ctx.config
        B, *rest = ctx.saved_tensors
        us, gates, kept = rest[:P], rest[P:2 * P], iter(rest[2 * P:])
        masks = [next(kept) if m else None for m in has_mask]
        h = _gated(us, gates, experts, scales)
        dB = (dy.t() @ h).to(B_dtype) if ctx.needs_input_grad[3] else None
        dh = dy @ B.to(h.dtype)
        dus, dlogits = [], []
        dhs = dh.split([u.shape[1] for u in us], 1)
        for dh_p, u, g, mask, k, s, q in zip(dhs, us, gates, masks, experts, scales, dropouts):
            dh3 = dh_p.reshape(-1, k, dh_p.shape[1] // k)
            dg = (dh3 * u.reshape(dh3.shape)).sum(-1).to(g.dtype) * s
            dlogits.append((g * (dg - (dg * g).sum(-1, keepdim=True))).to(logits_dtype))
            du = (dh3 * (g * s).to(dh3.dtype).unsqueeze(-1)).view(dh_p.shape)
            if mask is not None:
                du = du * mask * (1.0 / (1.0 - q))
            dus.append(du)
        du_all = dus[0] if P == 1 else torch.cat(dus, dim=1)
        dlogits_all = dlogits[0] if P == 1 else torch.cat(dlogits, dim=1)
        return (dy if has_y else None), du_all, dlogits_all, dB, None, None, None, None, None


def adapter_delta(x2, A, B, router, ranks, experts, scales, token_plugin, dropouts) -> torch.Tensor:
    """The adapter's output alone, [T, d_out]."""
    u_all, logits_all = _products(x2, A, router)
    return GatedUpProjection.apply(None, u_all, logits_all, B, ranks, experts, scales, token_plugin, dropouts)


def hlora_reference(x2, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropouts) -> torch.Tensor:
    """y [T, d_out] for x2 [T, d_in] in torch ops: the base (``weight`` [d_out, d_in] and ``bias``, or
    ``weight`` a callable base module with ``bias`` None) plus the adapter, added by one addmm.

    Inference (nothing to differentiate, no dropout: a decode step) skips ``GatedUpProjection``'s
    autograd bookkeeping and runs its forward's ops directly: the same ops in the same order, so
    the same bits (``rank_space``)."""
    u_all, logits_all = _products(x2, A, router)
    y = weight(x2) if callable(weight) else F.linear(x2, weight, bias)
    if not any(dropouts) and not (torch.is_grad_enabled() and (
            y.requires_grad or u_all.requires_grad or logits_all.requires_grad or B.requires_grad)):
        h = _gated(*_plugin_parts(u_all, logits_all, ranks, experts, token_plugin, dropouts)[:2], experts, scales)
        return torch.addmm(y, h, _cast(B, h.dtype).t())
    return GatedUpProjection.apply(y, u_all, logits_all, B, ranks, experts, scales, token_plugin, dropouts)
