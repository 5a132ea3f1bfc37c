"""Triton kernels and launchers for the fused H-LoRA linear layer.

What one adapted layer computes (``hlora.functional`` has the contract; T tokens, D = d_in,
N = d_out, R = sum of plugin ranks, K = sum of plugin expert counts)::

    UL = x @ [A; router]^T                       [T, R + K]   rank-space values and router logits
    h  = gate(UL)                                [T, R]       softmax, routing mask, scale, dropout
    y  = [x, h] @ [W0, B]^T + bias               [T, N]       one GEMM over an extended K axis

and its backward (W0 and bias are frozen: no gradient for them)::

    dh   = dy @ B                                [T, R]
    dUL  = gate_backward(dh, UL)                 [T, R + K]   (and h again, for dB)
    dx   = [dy, dUL] @ [W0; [A; router]]         [T, D]       extended K again
    dB   = dy^T @ h                              [N, R]       split over T
    dAR  = dUL^T @ x                             [R + K, D]   split over T: dA and drouter

Six products run through one GEMM kernel (``_gemm_kernel``: C = A1 @ B1^T + A2 @ B2^T + bias for
any strides, optional split of the first K axis) and the rank-space work through two small kernels
on [T, R + K] (``_gate_fwd_kernel``, ``_gate_bwd_kernel``). Saved between forward and backward:
x, UL (float32) and the dropout seed; nothing of width d_out, no dropout mask.

Dropout is Philox (``tl.rand``) keyed by (seed, token * R + rank column), so the backward redraws
the forward's mask from the seed alone.

Under ``TRITON_INTERPRET=1`` (how the kernels run on a CPU) every kernel uses one small tile
configuration and upcasts its operands to float32 after loading: the interpreter's bf16 ``tl.dot``
multiplies raw bit patterns. This file must therefore be imported after the environment variable
is set; ``hlora.kernels.ops`` imports it lazily, on the first kernel call.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton import knobs

from . import reference

INTERPRET = bool(knobs.runtime.interpret)

# the dtypes the kernels compute in (float32 at IEEE precision, no TF32)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# softmax weights of logits far below the row max are flushed to 0, as `router_gates` does
GATE_LOG_FLOOR = tl.constexpr(reference.GATE_LOG_FLOOR)


def _empty(shape, dtype, device):
    """Output allocation; ``HLORA_KERNELS_POISON=1`` fills it with NaN (or -1) so that tests catch
    any element a kernel forgets to write."""
    if os.environ.get("HLORA_KERNELS_POISON", "0") == "1":
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# 1. GEMM with an extended K axis: C[M, N] = A1 @ B1^T (+ A2 @ B2^T) (+ bias)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gemm_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
    M, N, K1, K2,
    K_SPLIT,  # length of K1 each program along grid axis 1 reduces (K1 when the K axis is not split)
    stride_a1m, stride_a1k, stride_b1n, stride_b1k,
    stride_a2m, stride_a2k, stride_b2n, stride_b2k,
    stride_cs, stride_cm, stride_cn,
    HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped tile order: GROUP_M row tiles share each column tile while it sits in L2
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows/columns past the edge load a valid row again (never stored): only K needs load masks
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # first operand pair, over this program's slice [k_lo, k_hi) of K1
    k_lo = pid_s * K_SPLIT
    k_hi = min(K1, k_lo + K_SPLIT)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_hi
        a = tl.load(a1_ptr + rm[:, None] * stride_a1m + kk[None, :] * stride_a1k, mask=k_ok[None, :], other=0.0)
        b = tl.load(b1_ptr + kk[:, None] * stride_b1k + rn[None, :] * stride_b1n, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)

    # second operand pair (the adapter's K columns), accumulated into the same tile
    if HAS_A2:
        for k0 in range(0, K2, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K2
            a = tl.load(a2_ptr + rm[:, None] * stride_a2m + kk[None, :] * stride_a2k, mask=k_ok[None, :], other=0.0)
            b = tl.load(b2_ptr + kk[:, None] * stride_b2k + rn[None, :] * stride_b2n, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]

    c_ptrs = c_ptr + pid_s * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# Large problems (the training shapes) pick a tile by autotuning; small ones (decode steps, tests)
# and the interpreter use one fixed tile: tuning them would cost more than it could save.
_TUNED_SHAPES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), for H100 / H200
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 32, 64, 4, 4),
]
_SMALL_PROBLEM = 2**30  # M * N * K below this (about 1 GFLOP, microseconds on an H100): fixed tile


def _fixed_config(M):
    if INTERPRET:  # small tiles: several tiles and K steps even on the tests' tiny shapes
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
    return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (N = R + K is often 68): they only waste tuning time."""
    m_cap = max(32, triton.next_power_of_2(named_args["M"]))
    n_cap = max(32, triton.next_power_of_2(named_args["N"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap]
    return kept or configs[-1:]


def _bench(kernel_call, quantiles):  # short timing runs: tuning happens once per shape, in the first step
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_gemm_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in _TUNED_SHAPES
    ],
    key=["M", "N", "K1", "K2", "K_SPLIT", "HAS_A2", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_bench,
)(_gemm_kernel)


_NUM_SMS: dict = {}


def _split_for(M: int, N: int, K: int, device: torch.device) -> int:
    """How many programs share one output tile's K axis: enough tiles for about two waves of SMs
    when M x N is small and K (the token axis, for weight gradients) is long."""
    if INTERPRET or device.type != "cuda":
        return 1
    if device not in _NUM_SMS:
        _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    return max(1, min(2 * _NUM_SMS[device] // tiles, K // 512))


_SPLIT_ALIGN = 16 if INTERPRET else 256  # a multiple of every config's BLOCK_K


def gemm(a1, b1, a2=None, b2=None, bias=None, *, out_dtype, dot_dtype, split_k=None):
    """C[M, N] = a1 @ b1^T (+ a2 @ b2^T) (+ bias) for a1 [M, K1], b1 [N, K1], a2 [M, K2], b2 [N, K2],
    any strides (pass transposed views freely). Products in ``dot_dtype`` (operands are cast after
    loading), accumulation in float32, result in ``out_dtype``. ``split_k`` (default: a heuristic)
    splits K1 over programs that write float32 partials, summed afterwards."""
    M, K1 = a1.shape
    N = b1.shape[0]
    K2 = a2.shape[1] if a2 is not None else 0
    if split_k is None:
        split_k = 1 if a2 is not None else _split_for(M, N, K1, a1.device)
    split_k = max(1, min(split_k, triton.cdiv(K1, _SPLIT_ALIGN)))
    if split_k > 1:  # equal slices of K1, each a multiple of every BLOCK_K
        k_split = triton.cdiv(triton.cdiv(K1, split_k), _SPLIT_ALIGN) * _SPLIT_ALIGN
        split_k = triton.cdiv(K1, k_split)
    if split_k == 1:
        k_split = max(K1, 1)
        c = _empty((M, N), out_dtype, a1.device)
        c_strides = (0, c.stride(0), c.stride(1))
    else:
        c = _empty((split_k, M, N), torch.float32, a1.device)
        c_strides = c.stride()
    if M == 0 or N == 0:
        return c.zero_() if split_k == 1 else c.sum(0).to(out_dtype)
    has_a2 = a2 is not None
    a2s = (a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1)) if has_a2 else (0, 0, 0, 0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

    if INTERPRET or M * N * (K1 + K2) < _SMALL_PROBLEM:
        kernel, tile = _gemm_kernel, _fixed_config(M)
    else:
        kernel, tile = _gemm_tuned, {}
    kernel[grid](
        a1, b1, a2 if has_a2 else a1, b2 if has_a2 else b1, bias.contiguous() if bias is not None else a1, c,
        M, N, K1, K2, k_split,
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        *a2s,
        *c_strides,
        HAS_A2=has_a2, HAS_BIAS=bias is not None,
        DOT_DTYPE=tl.float32 if INTERPRET else _TL_DTYPE[dot_dtype],
        PRECISION="ieee" if (INTERPRET or dot_dtype == torch.float32) else "tf32",
        **tile,
    )
    return c if split_k == 1 else c.sum(0).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# 2. Rank-space gate: softmax over each plugin's experts, routing mask, scale, dropout
# ----------------------------------------------------------------------------------------------
# Grid: (token blocks, plugins). Program (i, q) owns plugin q's R_q rank columns and k_q logits for
# its tokens, viewed as a [tokens, k_q experts, r_q ranks] block (column r_off + e * r_q + j), and
# writes all of them: zeros for tokens routed elsewhere. meta[q] = (r_off, k_off, r_q, k_q) and
# scale[q] = (s_q, dropout probability of plugin q).


@triton.jit
def _load_plugin_gates(ul_ptr, tp_ptr, meta_ptr, offs_t, t_ok, rows, R, q,
                       HAS_ROUTING: tl.constexpr, K_PAD: tl.constexpr):
    """softmax of plugin q's logits for a block of tokens, 0 for tokens not routed to q: [BLOCK_T, K_PAD]."""
    k_off = tl.load(meta_ptr + 4 * q + 1)
    k_q = tl.load(meta_ptr + 4 * q + 3)
    offs_e = tl.arange(0, K_PAD)
    e_ok = offs_e < k_q
    logits = tl.load(ul_ptr + rows[:, None] + (R + k_off + offs_e)[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
    z = tl.where(e_ok[None, :], logits, float("-inf"))
    z = z - tl.max(z, axis=1)[:, None]
    z = tl.where(z < GATE_LOG_FLOOR, float("-inf"), z)
    p = tl.exp(z)
    g = p / tl.sum(p, axis=1)[:, None]
    if HAS_ROUTING:
        routed = tl.load(tp_ptr + offs_t, mask=t_ok, other=-1) == q
    else:
        routed = (offs_t * 0 + q) == 0  # no routing tensor: every token uses plugin 0
    return tl.where(routed[:, None], g, 0.0)


@triton.jit
def _dropout_factor(seed, offs_t, col, R, p_drop):
    """Philox keep mask scaled by 1 / (1 - p) for columns ``col`` of tokens ``offs_t`` (3-D block)."""
    rnd = tl.rand(seed, offs_t[:, None, None] * R + col[None, :, :])
    return tl.where(rnd >= p_drop, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit(do_not_specialize=["seed"])
def _gate_fwd_kernel(
    ul_ptr, tp_ptr, meta_ptr, scale_ptr, h_ptr,
    T, R, stride_ul, stride_h, seed,
    HAS_ROUTING: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
):
    q = tl.program_id(1)
    r_off = tl.load(meta_ptr + 4 * q)
    r_q = tl.load(meta_ptr + 4 * q + 2)
    k_q = tl.load(meta_ptr + 4 * q + 3)
    s_q = tl.load(scale_ptr + 2 * q)
    p_drop = tl.load(scale_ptr + 2 * q + 1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    rows = offs_t.to(tl.int64) * stride_ul
    g = _load_plugin_gates(ul_ptr, tp_ptr, meta_ptr, offs_t, t_ok, rows, R, q, HAS_ROUTING, K_PAD)
    g3 = (g * s_q)[:, :, None]

    offs_e = tl.arange(0, K_PAD)
    for j0 in range(0, r_q, R_CHUNK):
        offs_j = j0 + tl.arange(0, R_CHUNK)
        col = r_off + offs_e[:, None] * r_q + offs_j[None, :]  # [K_PAD, R_CHUNK]
        mask = t_ok[:, None, None] & ((offs_e[:, None] < k_q) & (offs_j[None, :] < r_q))[None, :, :]
        u = tl.load(ul_ptr + rows[:, None, None] + col[None, :, :], mask=mask, other=0.0)
        h = u * g3
        if HAS_DROPOUT:
            h = h * _dropout_factor(seed, offs_t, col, R, p_drop)
        h_ptrs = h_ptr + offs_t.to(tl.int64)[:, None, None] * stride_h + col[None, :, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _gate_bwd_kernel(
    ul_ptr, dh_ptr, tp_ptr, meta_ptr, scale_ptr, h_ptr, dul_ptr,
    T, R, stride_ul, stride_dh, stride_h, stride_dul, seed,
    HAS_ROUTING: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
):
    # h = s * u * m * g[e] (m: dropout factor), so du = dh * s * m * g[e],
    # dg[e] = sum_j dh * s * u * m, and dlogits = g * (dg - sum_e g * dg) (softmax backward).
    q = tl.program_id(1)
    r_off = tl.load(meta_ptr + 4 * q)
    k_off = tl.load(meta_ptr + 4 * q + 1)
    r_q = tl.load(meta_ptr + 4 * q + 2)
    k_q = tl.load(meta_ptr + 4 * q + 3)
    s_q = tl.load(scale_ptr + 2 * q)
    p_drop = tl.load(scale_ptr + 2 * q + 1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    t64 = offs_t.to(tl.int64)
    rows = t64 * stride_ul
    g = _load_plugin_gates(ul_ptr, tp_ptr, meta_ptr, offs_t, t_ok, rows, R, q, HAS_ROUTING, K_PAD)
    g3 = g[:, :, None]

    offs_e = tl.arange(0, K_PAD)
    dg = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for j0 in range(0, r_q, R_CHUNK):
        offs_j = j0 + tl.arange(0, R_CHUNK)
        col = r_off + offs_e[:, None] * r_q + offs_j[None, :]
        mask = t_ok[:, None, None] & ((offs_e[:, None] < k_q) & (offs_j[None, :] < r_q))[None, :, :]
        u = tl.load(ul_ptr + rows[:, None, None] + col[None, :, :], mask=mask, other=0.0)
        dh = tl.load(dh_ptr + t64[:, None, None] * stride_dh + col[None, :, :], mask=mask, other=0.0)
        if HAS_DROPOUT:
            sm = s_q * _dropout_factor(seed, offs_t, col, R, p_drop)
        else:
            sm = s_q
        su = u * sm
        tl.store(h_ptr + t64[:, None, None] * stride_h + col[None, :, :], (su * g3).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(dul_ptr + t64[:, None, None] * stride_dul + col[None, :, :], (dh * sm * g3).to(dul_ptr.dtype.element_ty), mask=mask)
        dg += tl.sum(dh * su, axis=2)

    dlogits = g * (dg - tl.sum(g * dg, axis=1)[:, None])
    dl_ptrs = dul_ptr + t64[:, None] * stride_dul + (R + k_off + offs_e)[None, :]
    tl.store(dl_ptrs, dlogits.to(dul_ptr.dtype.element_ty), mask=t_ok[:, None] & (offs_e < k_q)[None, :])


_META_CACHE: dict = {}


def _plugin_meta(ranks, experts, scales, dropouts, device):
    """Per plugin (r_off, k_off, r_q, k_q) as int32 [P, 4] and (scale, dropout) as float32 [P, 2],
    cached per device (no host-to-device copy after the first call)."""
    key = (ranks, experts, scales, dropouts, device)
    if key not in _META_CACHE:
        rows, r_off, k_off = [], 0, 0
        for R_p, k_p in zip(ranks, experts):
            rows.append((r_off, k_off, R_p // k_p, k_p))
            r_off, k_off = r_off + R_p, k_off + k_p
        meta = torch.tensor(rows, dtype=torch.int32, device=device)
        scale = torch.tensor(list(zip(scales, dropouts)), dtype=torch.float32, device=device)
        _META_CACHE[key] = (meta, scale)
    return _META_CACHE[key]


def _gate_blocks(ranks, experts):
    """(BLOCK_T, K_PAD, R_CHUNK) for the gate kernels: about 4096 elements per [tokens, k, r] block."""
    k_pad = max(2, triton.next_power_of_2(max(experts)))
    r_max = max(R_p // k_p for R_p, k_p in zip(ranks, experts))
    if INTERPRET:  # small chunks, so the tests exercise the token-block and rank-chunk loops
        return 4, k_pad, 2
    r_chunk = max(2, min(triton.next_power_of_2(r_max), 512 // k_pad))
    block_t = max(2, min(64, 4096 // (k_pad * r_chunk)))
    return block_t, k_pad, r_chunk


def _check_launch(x, R, dropouts):
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "hlora.kernels: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before their "
            "first call to run (slowly) on the CPU; HLORA_BACKEND=torch avoids them."
        )
    if max(dropouts) > 0 and x.shape[0] * R >= 2**31:
        raise ValueError(f"dropout offsets (tokens x rank = {x.shape[0]} x {R}) overflow int32: split the batch")


# ----------------------------------------------------------------------------------------------
# 3. Launchers: the whole forward and the whole backward of one layer
# ----------------------------------------------------------------------------------------------


def hlora_forward(x, weight, bias, A, B, router, token_plugin, ranks, experts, scales, dropouts, seed):
    """x [T, D] -> (y [T, N] in x.dtype, UL [T, R + K] float32, saved for the backward).
    ranks / experts / scales / dropouts: tuples, one entry per plugin; token_plugin: int32 [T] or None."""
    T, R = x.shape[0], sum(ranks)
    _check_launch(x, R, dropouts)
    dt = x.dtype
    w_cat = torch.cat([A, router.to(A.dtype)])  # [R + K, D], cast to x.dtype tile by tile in the GEMM
    ul = gemm(x, w_cat, out_dtype=torch.float32, dot_dtype=dt)
    h = _empty((T, R), dt, x.device)
    if T > 0:
        meta, scale = _plugin_meta(ranks, experts, scales, dropouts, x.device)
        block_t, k_pad, r_chunk = _gate_blocks(ranks, experts)
        _gate_fwd_kernel[(triton.cdiv(T, block_t), len(ranks))](
            ul, token_plugin if token_plugin is not None else meta, meta, scale, h,
            T, R, ul.stride(0), h.stride(0), seed,
            HAS_ROUTING=token_plugin is not None, HAS_DROPOUT=max(dropouts) > 0,
            BLOCK_T=block_t, K_PAD=k_pad, R_CHUNK=r_chunk,
        )
    y = gemm(x, weight, h, B, bias, out_dtype=dt, dot_dtype=dt)
    return y, ul


def hlora_backward(dy, x, weight, A, B, router, token_plugin, ul, ranks, experts, scales, dropouts, seed,
                   need_dx=True, need_dw=True):
    """-> (dx [T, D] in x.dtype or None, dB [N, R] float32 or None, d[A; router] [R + K, D] float32 or None)."""
    T, R = x.shape[0], sum(ranks)
    _check_launch(x, R, dropouts)
    dt = x.dtype
    dh = gemm(dy, B.t(), out_dtype=torch.float32, dot_dtype=dt)  # [T, R]
    h = _empty((T, R), dt, x.device)
    dul = _empty((T, ul.shape[1]), dt, x.device)
    if T > 0:
        meta, scale = _plugin_meta(ranks, experts, scales, dropouts, x.device)
        block_t, k_pad, r_chunk = _gate_blocks(ranks, experts)
        _gate_bwd_kernel[(triton.cdiv(T, block_t), len(ranks))](
            ul, dh, token_plugin if token_plugin is not None else meta, meta, scale, h, dul,
            T, R, ul.stride(0), dh.stride(0), h.stride(0), dul.stride(0), seed,
            HAS_ROUTING=token_plugin is not None, HAS_DROPOUT=max(dropouts) > 0,
            BLOCK_T=block_t, K_PAD=k_pad, R_CHUNK=r_chunk,
        )
    w_cat = torch.cat([A, router.to(A.dtype)])
    dx = gemm(dy, weight.t(), dul, w_cat.t(), out_dtype=dt, dot_dtype=dt) if need_dx else None
    dB = dw_cat = None
    if need_dw:
        dB = gemm(dy.t(), h.t(), out_dtype=torch.float32, dot_dtype=dt)  # [N, R]
        dw_cat = gemm(dul.t(), x.t(), out_dtype=torch.float32, dot_dtype=dt)  # [R + K, D]
    return dx, dB, dw_cat
