"""The small-T (decode) H-LoRA linear: one kernel launch per adapted linear for T <= 64 tokens.

Computes, for x [T, D] (``hlora.kernels.reference`` has the math; N = d_out, R / K = summed ranks /
experts of the P plugins, no dropout: inference only, no backward)::

    UL = x @ [A; router]^T          [T, R + K]  rank-space values and router logits
    h  = gate(UL)                   [T, R]      per-plugin softmax (floored), scale, token routing
    y  = x @ W0^T + bias + h @ B^T  [T, N]

At decode the layer is a GEMV over W0: bandwidth-bound, and a few microseconds long, so a second or
third launch (UL, then y) costs as much as the work. One launch does it all with two kinds of
programs in one grid:

- producers (program ids 0 .. P-1): each computes ``BLOCK_R`` columns of UL over all of D (A and the
  router read where they live, never concatenated), stores them (fp32) to a workspace, then
  increments a device counter (release);
- consumers (the rest): each computes its ``BLOCK_N`` output columns of ``x @ W0^T + bias`` first,
  then waits for the counter to reach P (acquire), reads all of UL (a few KB), applies the gate
  (for the expert of each rank column: a [T, K] x [K, R] one-hot product, exact in fp32), adds
  ``h @ B[n_tile]^T`` and stores y. The last consumer to finish resets the counters, so the next
  launch (the next layer) starts from zero without a memset.

Producers have the lowest program ids and never wait, so under in-order block dispatch (what CUDA
does, and what the Triton interpreter does sequentially) they always complete; the consumers' W0 work
overlaps with theirs. The workspace and counters are allocated once per (device, T bucket, R + K) and
kept, so the launch allocates only its output and can be captured in a CUDA graph; the per-column
gate tables are built once per plugin layout. Launches that share a workspace must be ordered (one
stream), which a decode step is.

``decode_linear`` is the same launch as a custom op (``hlora::decode_linear``), what a step traced by
``torch.compile`` calls: opaque to the tracer (its workspace dictionaries and launch records are host
state), with a fake implementation for the output's shape.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton import knobs

from . import fused_linear, reference
from .fused_linear import _empty  # outputs start as NaN under HLORA_KERNELS_POISON=1, like the other kernels

__all__ = ["MAX_DECODE_TOKENS", "decode_hlora_linear", "decode_linear", "supports"]

MAX_DECODE_TOKENS = 64
INTERPRET = bool(knobs.runtime.interpret)
GATE_LOG_FLOOR = tl.constexpr(reference.GATE_LOG_FLOOR)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# one tile, not tuned: BLOCK_R is the UL columns per producer and a consumer's rank chunk
TILE = dict(BLOCK_N=64, BLOCK_D=64, BLOCK_R=16, num_warps=4, num_stages=2)


@triton.jit
def _decode_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, router_ptr, b_ptr, tp_ptr, y_ptr, ul_ptr, counter_ptr,
    col_plugin_ptr, col_expert_ptr, col_scale_ptr, logit_plugin_ptr,
    T, D, N, R, K, NUM_PRODUCERS, NUM_CONSUMERS,
    stride_xt, stride_xd, stride_wn, stride_wd, stride_ar, stride_ad, stride_rk, stride_rd,
    stride_bn, stride_br, stride_yt, stride_yn, stride_ult,
    HAS_BIAS: tl.constexpr, HAS_TP: tl.constexpr, NUM_PLUGINS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    if pid < NUM_PRODUCERS:
        # ---- producer: UL[:, cols] = x @ [A; router][cols]^T ------------------------------------
        cols = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        in_a = cols < R
        in_router = (cols >= R) & (cols < R + K)
        ul_acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dp = d0 + offs_d
            dp_ok = dp < D
            xs = tl.load(x_ptr + offs_t[:, None] * stride_xt + dp[None, :] * stride_xd,
                         mask=t_ok[:, None] & dp_ok[None, :], other=0.0)
            mat = tl.load(a_ptr + cols[None, :] * stride_ar + dp[:, None] * stride_ad,
                          mask=in_a[None, :] & dp_ok[:, None], other=0.0)
            mat += tl.load(router_ptr + (cols - R)[None, :] * stride_rk + dp[:, None] * stride_rd,
                           mask=in_router[None, :] & dp_ok[:, None], other=0.0)
            ul_acc = tl.dot(xs.to(DOT_DTYPE), mat.to(DOT_DTYPE), ul_acc, input_precision=PRECISION)
        tl.store(ul_ptr + offs_t[:, None] * stride_ult + cols[None, :], ul_acc,
                 mask=t_ok[:, None] & (cols < R + K)[None, :])
        tl.debug_barrier()  # every thread's stores precede the one thread's release
        tl.atomic_add(counter_ptr, 1, sem="release")
    else:
        # ---- consumer: y[:, n_tile] = x @ W0^T + bias + h @ B^T ----------------------------------
        offs_n = (pid - NUM_PRODUCERS) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            x = tl.load(x_ptr + offs_t[:, None] * stride_xt + d[None, :] * stride_xd,
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + d[:, None] * stride_wd,
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

        ready = tl.atomic_add(counter_ptr, 0, sem="acquire")
        while ready < NUM_PRODUCERS:
            ready = tl.atomic_add(counter_ptr, 0, sem="acquire")
        tl.debug_barrier()  # no thread reads UL before the acquire

        # gates [T, K]: softmax over each plugin's logits, floored like reference.router_gates
        offs_k = tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        logits = tl.load(ul_ptr + offs_t[:, None] * stride_ult + (R + offs_k)[None, :],
                         mask=t_ok[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
        logit_plugin = tl.load(logit_plugin_ptr + offs_k, mask=k_ok, other=-1)
        row_max = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for p in tl.static_range(NUM_PLUGINS):
            mine = (logit_plugin == p)[None, :]
            plugin_max = tl.max(tl.where(mine, logits, float("-inf")), axis=1)
            row_max = tl.where(mine, plugin_max[:, None], row_max)
        z = logits - row_max
        e = tl.where((z < GATE_LOG_FLOOR) | ~k_ok[None, :], 0.0, tl.exp(z))
        row_sum = tl.full((BLOCK_T, BLOCK_K), 1.0, dtype=tl.float32)
        for p in tl.static_range(NUM_PLUGINS):
            mine = (logit_plugin == p)[None, :]
            plugin_sum = tl.sum(tl.where(mine, e, 0.0), axis=1)
            row_sum = tl.where(mine, plugin_sum[:, None], row_sum)
        gates = e / row_sum
        if HAS_TP:
            tp = tl.load(tp_ptr + offs_t, mask=t_ok, other=-1)

        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + offs_r
            r_ok = r < R
            u = tl.load(ul_ptr + offs_t[:, None] * stride_ult + r[None, :],
                        mask=t_ok[:, None] & r_ok[None, :], other=0.0, cache_modifier=".cg")
            expert = tl.load(col_expert_ptr + r, mask=r_ok, other=-1)
            one_hot = (offs_k[:, None] == expert[None, :]).to(tl.float32)  # [K, BLOCK_R]
            g = tl.dot(gates, one_hot, input_precision="ieee")  # each rank column's gate, exactly
            scale = tl.load(col_scale_ptr + r, mask=r_ok, other=0.0)
            h = u * g * scale[None, :]
            if HAS_TP:
                plugin = tl.load(col_plugin_ptr + r, mask=r_ok, other=-2)
                h = tl.where(tp[:, None] == plugin[None, :], h, 0.0)
            b = tl.load(b_ptr + offs_n[None, :] * stride_bn + r[:, None] * stride_br,
                        mask=n_ok[None, :] & r_ok[:, None], other=0.0)
            acc = tl.dot(h.to(y_ptr.dtype.element_ty).to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & n_ok[None, :])

        # the last consumer resets the counters for the next launch
        finished = tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel")
        if finished == NUM_CONSUMERS - 1:
            tl.atomic_xchg(counter_ptr, 0)
            tl.atomic_xchg(counter_ptr + 1, 0)


_workspaces: dict = {}  # (device, T bucket, R + K) -> (UL, counters)
_tables: dict = {}  # (device, ranks, experts, scales) -> the gate tables


def _workspace(device: torch.device, block_t: int, width: int):
    """(UL [block_t, width] fp32, counters int32 [2] at zero), one per (device, T bucket, R + K), kept."""
    key = (device, block_t, width)
    if key not in _workspaces:
        _workspaces[key] = (_empty((block_t, width), torch.float32, device),
                            torch.zeros(2, dtype=torch.int32, device=device))
    return _workspaces[key]


def _gate_tables(device: torch.device, ranks: tuple, experts: tuple, scales: tuple):
    """Per rank column its plugin, the logit column of its expert and its scale; per logit its plugin."""
    key = (device, ranks, experts, scales)
    if key not in _tables:
        col_plugin, col_expert, col_scale, logit_plugin = [], [], [], []
        k0 = 0
        for p, (r_p, k_p, s_p) in enumerate(zip(ranks, experts, scales)):
            per_expert = r_p // k_p
            col_plugin += [p] * r_p
            col_expert += [k0 + j // per_expert for j in range(r_p)]
            col_scale += [s_p] * r_p
            logit_plugin += [p] * k_p
            k0 += k_p
        _tables[key] = (torch.tensor(col_plugin, dtype=torch.int32, device=device),
                        torch.tensor(col_expert, dtype=torch.int32, device=device),
                        torch.tensor(col_scale, dtype=torch.float32, device=device),
                        torch.tensor(logit_plugin, dtype=torch.int32, device=device))
    return _tables[key]


def supports(x2: torch.Tensor, weight, dropouts: Sequence[float]) -> bool:
    """Whether ``decode_hlora_linear`` takes this call: at most ``MAX_DECODE_TOKENS`` tokens, a tensor base,
    no dropout, and no gradient wanted (the launch has no backward)."""
    return (x2.shape[0] <= MAX_DECODE_TOKENS and isinstance(weight, torch.Tensor) and max(dropouts) == 0.0
            and not torch.is_grad_enabled())


def decode_hlora_linear(x2, weight, bias, A, B, router, ranks, experts, scales, token_plugin) -> torch.Tensor:
    """y [T, d_out] in x2's dtype for x2 [T <= 64, d_in], one launch (module docstring). Arguments as
    ``hlora.functional.hlora_linear`` normalises them: ``weight`` [d_out, d_in] (any strides), tuples of
    ints / floats, ``token_plugin`` int32 [T] or None (every token takes plugin 0)."""
    T, D = x2.shape
    N, R, K = weight.shape[0], A.shape[0], router.shape[0]
    if T > MAX_DECODE_TOKENS:
        raise ValueError(f"the decode kernel takes at most {MAX_DECODE_TOKENS} tokens, got {T}")
    if T == 0:
        return x2.new_empty(0, N)
    block_t = max(16, triton.next_power_of_2(T))
    ul, counters = _workspace(x2.device, block_t, R + K)
    col_plugin, col_expert, col_scale, logit_plugin = _gate_tables(x2.device, tuple(ranks), tuple(experts), tuple(scales))
    y = _empty((T, N), x2.dtype, x2.device)
    producers, consumers = triton.cdiv(R + K, TILE["BLOCK_R"]), triton.cdiv(N, TILE["BLOCK_N"])
    launch = fused_linear.Launch(
        role="decode",
        kernel=_decode_kernel,
        grid=lambda meta: (producers + consumers,),
        args=dict(
            x_ptr=x2, w_ptr=weight, bias_ptr=bias if bias is not None else y, a_ptr=A, router_ptr=router, b_ptr=B,
            tp_ptr=token_plugin if token_plugin is not None else counters, y_ptr=y, ul_ptr=ul, counter_ptr=counters,
            col_plugin_ptr=col_plugin, col_expert_ptr=col_expert, col_scale_ptr=col_scale, logit_plugin_ptr=logit_plugin,
            T=T, D=D, N=N, R=R, K=K, NUM_PRODUCERS=producers, NUM_CONSUMERS=consumers,
            stride_xt=x2.stride(0), stride_xd=x2.stride(1), stride_wn=weight.stride(0), stride_wd=weight.stride(1),
            stride_ar=A.stride(0), stride_ad=A.stride(1), stride_rk=router.stride(0), stride_rd=router.stride(1),
            stride_bn=B.stride(0), stride_br=B.stride(1), stride_yt=y.stride(0), stride_yn=y.stride(1),
            stride_ult=ul.stride(0),
        ),
        consts=dict(
            HAS_BIAS=bias is not None, HAS_TP=token_plugin is not None, NUM_PLUGINS=len(ranks),
            DOT_DTYPE=tl.float32 if INTERPRET else _TL_DTYPE[x2.dtype],
            PRECISION="ieee" if (INTERPRET or x2.dtype == torch.float32) else "tf32",
            BLOCK_T=block_t, BLOCK_K=max(16, triton.next_power_of_2(K)),
        ),
        tiles=[TILE],
        key=(block_t, D, N, R, K, str(x2.dtype)),
    )
    fused_linear._run(launch)  # runs it, or records it inside fused_linear.record_launches() (the compile gate)
    return y


@torch.library.custom_op("hlora::decode_linear", mutates_args=())
def decode_linear(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                  B: torch.Tensor, router: torch.Tensor, ranks: Sequence[int], experts: Sequence[int],
                  scales: Sequence[float], token_plugin: Optional[torch.Tensor]) -> torch.Tensor:
    """``decode_hlora_linear`` as a custom op (module docstring): the same arguments, the same launch."""
    return decode_hlora_linear(x2, weight, bias, A, B, router, tuple(ranks), tuple(experts), tuple(scales),
                               token_plugin)


@decode_linear.register_fake
def _(x2, weight, bias, A, B, router, ranks, experts, scales, token_plugin):
    return x2.new_empty(x2.shape[0], weight.shape[0])
