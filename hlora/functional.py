"""The one H-LoRA op every path goes through.

For tokens ``x`` [..., d_in], a frozen base ``W0`` [d_out, d_in] (+ ``bias``) and P plugins stacked
along the rank axis (plugin p owns ``ranks[p]`` rows of ``A``/columns of ``B`` and ``experts[p]`` rows
of ``router``)::

    g_p   = softmax(router_p @ x)                                  # k_p gate weights per token
    h_p   = dropout(s_p * (A_p @ x)) * repeat_interleave(g_p, r_p)  # r_p = R_p / k_p
    y     = W0 x + bias + sum_p [token routed to p] * B_p @ h_p

which equals ``W0 x + b + s * sum_i g_i B_i A_i x``, the MoELoRA mixture, in two GEMMs.
Tokens routed to no plugin (-1) get exactly the base output.

``HLORA_BACKEND`` picks the implementation: ``auto`` (default: fused Triton kernels for CUDA
tensors, this reference path otherwise), ``torch``, or ``triton`` (kernels everywhere; on a CPU
that needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["hlora_linear", "backend", "router_gates"]

_BACKENDS = ("auto", "torch", "triton")

# exp(-60) ~ 9e-27: gate weights below this contribute nothing at any float precision we compute
# in, but on a CPU they become subnormal products that slow every later GEMM of the layer ~10x.
_GATE_LOG_FLOOR = -60.0


def backend() -> str:
    """The backend named by ``HLORA_BACKEND`` (read on every call, so tests may change it)."""
    name = os.environ.get("HLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"HLORA_BACKEND={name!r} is not one of {', '.join(_BACKENDS)}")
    return name


def router_gates(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis, computed in at least float32, with negligible weights flushed
    to exact zeros (logits more than 60 below the row max become -inf before the softmax)."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    z = z - z.amax(dim=-1, keepdim=True).detach()
    z = z.masked_fill(z < _GATE_LOG_FLOOR, float("-inf"))
    return torch.softmax(z, dim=-1)


def _check_args(x, weight, A, B, router, ranks, experts, scales, token_plugin):
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but the base weight expects d_in={d_in}")
    if not (len(ranks) == len(experts) == len(scales)) or len(ranks) == 0:
        raise ValueError("ranks, experts and scales must name the same, non-zero number of plugins")
    R, K = sum(ranks), sum(experts)
    if tuple(A.shape) != (R, d_in):
        raise ValueError(f"A has shape {tuple(A.shape)}, expected [sum(ranks)={R}, d_in={d_in}]")
    if tuple(B.shape) != (d_out, R):
        raise ValueError(f"B has shape {tuple(B.shape)}, expected [d_out={d_out}, sum(ranks)={R}]")
    if tuple(router.shape) != (K, d_in):
        raise ValueError(f"router has shape {tuple(router.shape)}, expected [sum(experts)={K}, d_in={d_in}]")
    for r, k in zip(ranks, experts):
        if k < 1 or r % k:
            raise ValueError(f"plugin rank {r} is not divisible by its {k} experts")
    if token_plugin is None and len(ranks) > 1:
        raise ValueError(f"{len(ranks)} plugins are stacked but token_plugin is None: say which tokens take which")
    if token_plugin is not None:
        T = x.numel() // d_in
        if token_plugin.dim() != 1 or token_plugin.numel() != T:
            raise ValueError(f"token_plugin must hold one plugin index per token ({T}), got {tuple(token_plugin.shape)}")
        if token_plugin.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
            raise ValueError(f"token_plugin must be an integer tensor, got {token_plugin.dtype}")


def hlora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    router: torch.Tensor,
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    token_plugin: torch.Tensor | None = None,
    dropout: float | Sequence[float] = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Base linear plus the routed H-LoRA mixture (module docstring has the formula).

    Args:
        x: [..., d_in] activations.
        weight, bias: the frozen base layer, ``weight`` [d_out, d_in] (any strides).
        A: [sum(ranks), d_in]; B: [d_out, sum(ranks)]; router: [sum(experts), d_in].
        ranks, experts, scales: per plugin total rank R_p, expert count k_p and scale s_p.
        token_plugin: int tensor [T] (T = x.numel() // d_in) with each token's plugin index, -1 for
            none; ``None`` (one plugin only) routes every token to it, the usual one-task batch.
        dropout: probability (one for all plugins, or one per plugin), applied in rank space when
            ``training``.
    """
    ranks, experts, scales = tuple(int(r) for r in ranks), tuple(int(k) for k in experts), tuple(float(s) for s in scales)
    dropouts = (float(dropout),) * len(ranks) if isinstance(dropout, (int, float)) else tuple(float(p) for p in dropout)
    if len(dropouts) != len(ranks):
        raise ValueError(f"got {len(dropouts)} dropout probabilities for {len(ranks)} plugins")
    if not training:
        dropouts = (0.0,) * len(ranks)
    _check_args(x, weight, A, B, router, ranks, experts, scales, token_plugin)
    name = backend()
    if name == "triton" or (name == "auto" and x.is_cuda and _kernels_available()):
        from hlora.kernels import fused_hlora_linear

        return fused_hlora_linear(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropouts)
    return _torch_hlora_linear(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropouts)


def _kernels_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_hlora_linear(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropouts):
    """Reference path: one GEMM for [A; router], a view-based gate, one GEMM for B."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in)
    u_logits = x2 @ torch.cat([A, router]).to(x.dtype).t()  # [T, R + K]
    u_all, logits_all = u_logits.split([sum(ranks), sum(experts)], dim=1)
    hs = []
    for p, (u, logits, k_p, s_p, p_drop) in enumerate(
        zip(u_all.split(ranks, 1), logits_all.split(experts, 1), experts, scales, dropouts)
    ):
        g = router_gates(logits) * s_p  # dropout(s * u) * g == dropout(u) * (s * g): one pass fewer
        if token_plugin is not None:
            g = g * (token_plugin == p).unsqueeze(-1).to(g.dtype)
        if p_drop > 0:
            u = F.dropout(u, p_drop, training=True)
        hs.append((u.reshape(-1, k_p, u.shape[1] // k_p) * g.to(u.dtype).unsqueeze(-1)).view(-1, u.shape[1]))
    h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)
    y = F.linear(x2, weight, bias)
    y = torch.addmm(y, h, B.to(h.dtype).t())
    return y.view(*lead, weight.shape[0])
