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

__all__ = ["GATE_LOG_FLOOR", "router_gates", "rank_space", "adapter_delta", "hlora_reference"]

# exp(-60) ~ 9e-27: gate weights below this contribute nothing at any float precision we compute
# in, but on a CPU they become subnormal products that slow every later GEMM of the layer ~10x.
GATE_LOG_FLOOR = -60.0


def router_gates(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis, computed in at least float32, with negligible weights flushed
    to exact zeros (logits more than ``-GATE_LOG_FLOOR`` below the row max become -inf first)."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    z = z - z.amax(dim=-1, keepdim=True).detach()
    z = z.masked_fill(z < GATE_LOG_FLOOR, float("-inf"))
    return torch.softmax(z, dim=-1)


def rank_space(x2, A, router, ranks: Sequence[int], experts: Sequence[int], scales: Sequence[float],
               token_plugin, dropouts: Sequence[float]) -> torch.Tensor:
    """h [T, sum(ranks)] for x2 [T, d_in]: x2 A^T and the router logits x2 router^T, then each plugin's gate."""
    # two products, not one over torch.cat([A, router]): no copy of the weights per call (the same
    # dot products; a decode step is memory-bound and a CUDA graph would replay the copy every step)
    u_all, logits_all = x2 @ A.to(x2.dtype).t(), x2 @ router.to(x2.dtype).t()  # [T, R], [T, K]
    hs = []
    for p, (u, logits, k_p, s_p, p_drop) in enumerate(
        zip(u_all.split(list(ranks), 1), logits_all.split(list(experts), 1), experts, scales, dropouts)
    ):
        g = router_gates(logits) * s_p  # dropout(s * u) * g == dropout(u) * (s * g): one pass fewer
        if token_plugin is not None:
            g = g * (token_plugin == p).unsqueeze(-1).to(g.dtype)
        if p_drop > 0:
            u = F.dropout(u, p_drop, training=True)
        hs.append((u.reshape(-1, k_p, u.shape[1] // k_p) * g.to(u.dtype).unsqueeze(-1)).view(-1, u.shape[1]))
    return hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)


def adapter_delta(x2, A, B, router, ranks, experts, scales, token_plugin, dropouts) -> torch.Tensor:
    """The adapter's output alone, [T, d_out]."""
    h = rank_space(x2, A, router, ranks, experts, scales, token_plugin, dropouts)
    return h @ B.to(h.dtype).t()


def hlora_reference(x2, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropouts) -> torch.Tensor:
    """y [T, d_out] for x2 [T, d_in] in torch ops: the base (``weight`` [d_out, d_in] and ``bias``, or
    ``weight`` a callable base module with ``bias`` None) plus the adapter, added by one addmm."""
    h = rank_space(x2, A, router, ranks, experts, scales, token_plugin, dropouts)
    y = weight(x2) if callable(weight) else F.linear(x2, weight, bias)
    return torch.addmm(y, h, B.to(h.dtype).t())
