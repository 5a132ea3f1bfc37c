"""The one H-LoRA op every path goes through.

For tokens ``x`` [..., d_in], a frozen base ``W0`` [d_out, d_in] (+ ``bias``) and P plugins stacked
along the rank axis (plugin p owns ``ranks[p]`` rows of ``A``/columns of ``B`` and ``experts[p]`` rows
of ``router``)::

    g_p   = softmax(router_p @ x)                                  # k_p gate weights per token
    h_p   = dropout(s_p * (A_p @ x)) * repeat_interleave(g_p, r_p)  # r_p = R_p / k_p
    y     = W0 x + bias + sum_p [token routed to p] * B_p @ h_p

which equals ``W0 x + b + s * sum_i g_i B_i A_i x``, the MoELoRA mixture, in two GEMMs.
Tokens routed to no plugin (-1) get exactly the base output.

``hlora_mixture`` is the same op with each plugin's ``A`` / ``B`` / ``router`` separate (what
``HLoRALinear`` holds) and, for a mixed batch, the routing's grouping of tokens by plugin: the
kernels then run each plugin's rank work on its own tokens only and read the plugins' tensors
where they live (no concatenation per call).

``HLORA_BACKEND`` picks the implementation, here and nowhere else: ``auto`` (default: fused
Triton kernels for CUDA tensors, the torch reference otherwise), ``torch``, or ``triton`` (kernels
everywhere; on a CPU that needs ``TRITON_INTERPRET=1``). The math itself, its constants and
``router_gates`` live in ``hlora.kernels.reference``, below both backends.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

import torch

from hlora.kernels import fused_hlora_linear, grouped_hlora_linear
from hlora.kernels.reference import hlora_reference, router_gates

__all__ = ["hlora_linear", "hlora_mixture", "backend", "router_gates"]

_BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def backend() -> str:
    """The backend named by ``HLORA_BACKEND`` (read on every call, so tests may change it)."""
    name = os.environ.get("HLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"HLORA_BACKEND={name!r} is not one of {', '.join(_BACKENDS)}")
    return name


def _check_args(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin):
    R, K = sum(ranks), sum(experts)
    if callable(weight):
        if bias is not None:
            raise ValueError("a callable base computes its own bias: pass bias=None")
        d_out, d_in = B.shape[0], A.shape[1]
    else:
        d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but the base weight expects d_in={d_in}")
    if not (len(ranks) == len(experts) == len(scales)) or len(ranks) == 0:
        raise ValueError("ranks, experts and scales must name the same, non-zero number of plugins")
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
    return d_out, d_in


def hlora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
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
        weight, bias: the frozen base layer, ``weight`` [d_out, d_in] (any strides); or ``weight`` a
            callable base (a module of any kind, e.g. a quantized linear) mapping [T, d_in] to
            [T, d_out], with ``bias`` None: the kernels then add the adapter into its output.
        A: [sum(ranks), d_in]; B: [d_out, sum(ranks)]; router: [sum(experts), d_in].
        ranks, experts, scales: per plugin total rank R_p, expert count k_p and scale s_p.
        token_plugin: int tensor [T] (T = x.numel() // d_in) with each token's plugin index, -1 for
            none; ``None`` (one plugin only) routes every token to it, the usual one-task batch.
        dropout: probability (one for all plugins, or one per plugin), applied in rank space when
            ``training``.

    The arguments are checked and normalised here once (tuples, a [T, d_in] view, int32 routing,
    the autocast dtype for the kernels); both backends receive them so.
    """
    ranks, experts, scales, dropouts = _hparams(ranks, experts, scales, dropout, training)
    d_out, d_in = _check_args(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    tp = None if token_plugin is None else token_plugin.reshape(-1).to(device=x.device, dtype=torch.int32)
    if _use_kernels(x2, weight, bias):
        x2 = _autocast(x2)
        y = _decode_linear(x2, weight, bias, A, B, router, ranks, experts, scales, tp, dropouts)
        if y is None:
            y = fused_hlora_linear(x2, weight, bias, A, B, router, ranks, experts, scales, tp, dropouts)
    else:
        y = hlora_reference(x2, weight, bias, A, B, router, ranks, experts, scales, tp, dropouts)
    return y.view(*lead, d_out)


def _hparams(ranks, experts, scales, dropout, training):
    """-> (ranks, experts, scales, dropouts) as tuples; dropouts one per plugin, zeros unless training."""
    ranks, experts, scales = tuple(int(r) for r in ranks), tuple(int(k) for k in experts), tuple(float(s) for s in scales)
    dropouts = (float(dropout),) * len(ranks) if isinstance(dropout, (int, float)) else tuple(float(p) for p in dropout)
    if len(dropouts) != len(ranks):
        raise ValueError(f"got {len(dropouts)} dropout probabilities for {len(ranks)} plugins")
    if not all(0.0 <= p < 1.0 for p in dropouts):
        raise ValueError(f"dropout probabilities must lie in [0, 1), got {dropouts}")
    if not training:
        dropouts = (0.0,) * len(ranks)
    return ranks, experts, scales, dropouts


def _autocast(x2):
    """x2 in the autocast dtype when autocast is on (the kernels take one activation dtype)."""
    if torch.is_autocast_enabled(x2.device.type):
        return x2.to(torch.get_autocast_dtype(x2.device.type))
    return x2


def hlora_mixture(
    x: torch.Tensor,
    weight: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    bias: torch.Tensor | None,
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    routers: Sequence[torch.Tensor],
    ranks: Sequence[int],
    experts: Sequence[int],
    scales: Sequence[float],
    token_plugin: torch.Tensor | None = None,
    groups=None,
    dropout: float | Sequence[float] = 0.0,
    training: bool = False,
    stacked: Callable[[], tuple | None] | None = None,
) -> torch.Tensor:
    """``hlora_linear`` with each plugin's tensors separate: ``As[p]`` [R_p, d_in], ``Bs[p]``
    [d_out, R_p], ``routers[p]`` [k_p, d_in]; other arguments as ``hlora_linear``.

    ``groups``: the batch's tokens grouped by plugin (``hlora.routing.TokenGroups``: ``order`` [T],
    tokens sorted by plugin with the unrouted last, and ``counts``, host ints), consistent with
    ``token_plugin``. With it, a mixed batch (several plugins, ``token_plugin`` given) on the
    kernels runs each plugin's rank GEMMs on its own tokens only, reading every plugin's tensors
    where they live; every other case (the torch backend, one plugin, a decode step) stacks the
    plugins along the rank axis and calls ``hlora_linear``. ``stacked``: returns that stack
    ``(A, B, router)`` ready-made (a layer's inference copy), or ``None`` to concatenate here.
    """
    P = len(As)
    if not (len(Bs) == len(routers) == len(ranks) == P) or P == 0:
        raise ValueError(f"got {len(As)} A, {len(Bs)} B and {len(routers)} router tensors for {len(ranks)} plugins")
    if P > 1 and token_plugin is not None and groups is not None:
        ranks, experts, scales, dropouts = _hparams(ranks, experts, scales, dropout, training)
        for p in range(P):  # each plugin's shapes, and the routing tensor's
            d_out, d_in = _check_args(x, weight, bias, As[p], Bs[p], routers[p], ranks[p : p + 1], experts[p : p + 1],
                                      scales[p : p + 1], token_plugin)
        x2 = x.reshape(-1, d_in)
        order, counts = groups
        if order.dim() != 1 or order.numel() != x2.shape[0] or len(counts) != P or sum(counts) > x2.shape[0]:
            raise ValueError(f"token groups (order {tuple(order.shape)}, counts {tuple(counts)}) do not describe "
                             f"{x2.shape[0]} tokens of {P} plugins")
        if _use_kernels(x2, weight, bias):
            x2 = _autocast(x2)
            if not _decode_linear_applies(x2, weight, dropouts):
                order = order.to(device=x2.device, dtype=torch.int32)
                y = grouped_hlora_linear(x2, weight, bias, As, Bs, routers, ranks, experts, scales, order, counts,
                                         dropouts)
                return y.view(*x.shape[:-1], d_out)
    stack = None if stacked is None else stacked()
    A, B, router = stack if stack is not None else (_cat(As), _cat(Bs, 1), _cat(routers))
    return hlora_linear(x, weight, bias, A, B, router, ranks, experts, scales, token_plugin, dropout, training)


def _cat(tensors, dim=0):
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim)


def _decode_linear_applies(x2, weight, dropouts) -> bool:
    """Whether ``_decode_linear`` takes this call (a CUDA decode step): it reads stacked plugins."""
    if not x2.is_cuda:
        return False
    from hlora.kernels import decode  # imports Triton: only reached once the kernels are in use

    return decode.supports(x2, weight, dropouts)


def _decode_linear(x2, weight, bias, A, B, router, ranks, experts, scales, tp, dropouts):
    """On CUDA, T <= 64 tokens without gradients or dropout (a decode step): the one-launch decode
    kernel's y (through its custom op when ``torch.compile`` traces the call); otherwise None."""
    if not x2.is_cuda:
        return None
    from hlora.kernels import decode  # imports Triton: only reached once the kernels are in use

    if not decode.supports(x2, weight, dropouts):
        return None
    if torch.compiler.is_compiling():
        return decode.decode_linear(x2, weight, bias, A, B, router, ranks, experts, scales, tp)
    return decode.decode_hlora_linear(x2, weight, bias, A, B, router, ranks, experts, scales, tp)


_warned_frozen = False


def _use_kernels(x2, weight, bias) -> bool:
    """The fused kernels take float16/bfloat16/float32 activations and treat a tensor base as frozen:
    a base weight or bias that requires grad goes to the reference path (warned once)."""
    global _warned_frozen
    name = backend()
    if name == "torch" or (name == "auto" and not (x2.is_cuda and _kernels_available())):
        return False
    if x2.dtype not in _KERNEL_DTYPES:
        return False
    if callable(weight):
        return True
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        if not _warned_frozen:
            warnings.warn(
                "hlora: the base weight/bias requires grad, but the fused kernels treat the base layer as "
                "frozen; using the torch reference path for such layers.",
                stacklevel=3,
            )
            _warned_frozen = True
        return False
    return True


def _kernels_available() -> bool:
    try:
        import triton  # noqa: F401  (optional dependency: only probed)
    except ImportError:
        return False
    return True
