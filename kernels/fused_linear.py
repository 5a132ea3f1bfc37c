"""Triton kernels and launchers for the fused H-LoRA linear layer.

What one adapted layer computes (``hlora.kernels.reference`` has the math; T tokens, D = d_in,
N = d_out, R = sum of plugin ranks, K = sum of plugin expert counts)::

    UL = x @ [A; router]^T                       [T, R + K]   rank-space values and router logits
    h  = gate(UL)                                [T, R]       softmax, routing mask, scale, dropout
    y  = base(x) + h @ B^T                       [T, N]

and its backward (the base is frozen: no gradient for W0 or bias)::

    dh, dB = dy @ B, dy^T @ h                    one pass over dy (dB by fp32 atomics)
    dUL    = gate_backward(dh, UL)               [T, R + K]
    dx     = dy @ W0 + dUL @ [A; router]         [T, D]
    dA, drouter = dUL^T @ x                      split over T, fp32 atomics into the gradients

One plugin (alone, or one segment of a grouped batch) of up to 32 experts has its gate in the UL
GEMM's epilogue (without dropout) and its gate backward in the dh / dB pass's epilogue: no gate
launches, no fp32 dh; a plugin wider than one rank block adds a small launch that finishes its
router gradient. Stacked plugins (and the forward with dropout) run the gate kernels (section 3).

Rank-space activations (UL, h, dh, dUL) are allocated with rows padded to a multiple of 16
elements, so every rank-space operand row starts 16-byte aligned; A and the router are read where
they live (two pointers, never concatenated). Saved for the backward: x, UL (float32), h (x.dtype).
Weight gradients accumulate in float32 (one zero fill for dA, dB and drouter) and are returned
in the parameters' dtype (one ``cast_grads`` launch for the three; no copy when they are float32).

Two strategies for the base product, both exact (``HLORA_STRATEGY=auto|fused|cublas``):
``fused`` runs y and dx as one extended-K Triton GEMM ([x, h] @ [W0, B]^T; [dy, dUL] @ [W0; A;
router]); ``cublas`` writes the adapter's product (+ bias) with the same GEMM kernel first and lets
cuBLAS accumulate the base into it (``addmm_``, beta = 1: the output is read once more inside the
compute-bound GEMM instead of in a pass of its own); a base module's own forward output gets the
adapter added into a copy. ``auto`` times both on CUDA
once per shape bucket (``tuning.py``); the interpreter uses ``fused``. ``kernels/README.md`` lists
every launch of both plans.

A mixed batch may instead run grouped by plugin (``grouped_forward`` / ``grouped_backward``,
section 5): each plugin's launches on its own tensors and its own tokens, rows read and written
through the routing's sort permutation.

Launches go through ``_run``: tiles come from ``tuning.choose`` on CUDA (one choice per shape
bucket, cached on disk), a fixed small tile under ``TRITON_INTERPRET=1``; ``record_launches()``
collects the launches instead of running them (with meta tensors), which is how the compile gate
(``tests/test_kernel_compile.py``) compiles exactly what the launchers would launch.

Under ``TRITON_INTERPRET=1`` every kernel upcasts its operands to float32 after loading (the
interpreter's bf16 ``tl.dot`` multiplies raw bit patterns), so this file must be imported after
the environment variable is set; ``hlora.kernels.ops`` imports it lazily, on the first call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from triton import knobs

from . import reference, tuning

INTERPRET = bool(knobs.runtime.interpret)

# the dtypes the kernels compute in (float32 at IEEE precision, no TF32)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# softmax weights of logits far below the row max are flushed to 0, as `router_gates` does
GATE_LOG_FLOOR = tl.constexpr(reference.GATE_LOG_FLOOR)

RANK_ALIGN = 16  # rank-space rows are padded to a multiple of this many elements
STRATEGIES = ("auto", "fused", "cublas")


def padded(n: int) -> int:
    return -(-n // RANK_ALIGN) * RANK_ALIGN


def _empty(shape, dtype, device):
    """Output allocation; ``HLORA_KERNELS_POISON=1`` fills it with NaN (or -1) so that tests catch
    any element a kernel forgets to write."""
    if os.environ.get("HLORA_KERNELS_POISON", "0") == "1":
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros(shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device)


def strategy() -> str:
    name = os.environ.get("HLORA_STRATEGY", "auto").strip().lower() or "auto"
    if name not in STRATEGIES:
        raise ValueError(f"HLORA_STRATEGY={name!r} is not one of {', '.join(STRATEGIES)}")
    return name


# ----------------------------------------------------------------------------------------------
# launches: run, tune, or record
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch: ``kernel[grid(meta)](**args, **consts, **tile)`` for the chosen tile."""

    role: str  # what it computes, e.g. "ul", "y", "dh_db" (names used in kernels/README.md)
    kernel: object
    grid: Callable[[dict], tuple]
    args: dict  # runtime arguments in the kernel's order (tensors, ints, floats)
    consts: dict  # constexpr arguments fixed by the launcher
    tiles: list  # candidate tiles: constexpr block sizes plus num_warps / num_stages
    key: tuple  # tuning key: shape with token counts bucketed, dtypes, flags
    reset: Optional[Callable[[], None]] = None  # re-zeroes atomic accumulators after tuning runs


_recording: Optional[list] = None


@contextlib.contextmanager
def record_launches():
    """Within the block the launchers append ``Launch`` records to the yielded list instead of
    running kernels, and strategy ``auto`` plans ``fused``; meta tensors are accepted."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def tile_name(tile: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(tile.items()))


def _go(launch: Launch, tile: dict):
    meta = {k: v for k, v in tile.items() if k not in ("num_warps", "num_stages")}
    launch.kernel[launch.grid(meta)](
        **launch.args, **launch.consts, **meta, num_warps=tile["num_warps"], num_stages=tile["num_stages"]
    )


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25)


def _run(launch: Launch):
    if _recording is not None:
        _recording.append(launch)
        return
    tiles = launch.tiles
    if len(tiles) == 1:
        _go(launch, tiles[0])
        return
    by_name = {tile_name(t): t for t in tiles}
    device = next(v.device for v in launch.args.values() if isinstance(v, torch.Tensor))
    measured = []

    def measure(name):
        measured.append(name)
        return _bench(lambda: _go(launch, by_name[name]))

    best = tuning.choose(launch.role, device, launch.key, list(by_name), measure)
    if measured and launch.reset is not None:
        launch.reset()
    _go(launch, by_name[best])


# ----------------------------------------------------------------------------------------------
# 1. GEMM: C[M, N] (+)= A1 @ B1^T (+ A2 @ B2^T) (+ A3 @ B3^T) (+ bias) (+ Cin)
# ----------------------------------------------------------------------------------------------
# Options (all constexpr): B1's rows come from two tensors split at N_SPLIT (x @ [A; router]^T),
# output rows split at M_SPLIT into two tensors (dA and drouter), K1 split over grid axis 1 with
# fp32 atomic accumulation (weight gradients), Cin an input matrix added in the epilogue (the
# base's output, for the cublas strategy; it may alias C). Grouped plugins (one plugin's row
# segment of a mixed batch): A1's rows (IDX_A1), C's and Cin's rows (IDX_C) or B1's K index
# (IDX_B1K, the token axis of a weight gradient) are read through the token index ``idx`` [M]
# (the segment's slice of the routing's sort permutation): no gathered copy of x, dy, y or dx.
# GATE: C is one plugin's UL and the epilogue also writes h = gate(UL) (``_gate_forward``, section
# 3; plugin GATE_Q's row of the gate table, GATE_R the dropout row width): one column tile spans
# the plugin's R_p + k_p columns, or (ROUTER_ACC, a wider plugin) the tiles cover its R_p rank
# columns and each also accumulates its rows' k_p logits x @ router^T in a [BLOCK_M, K_PAD] tile of
# its own, stored at columns N_SPLIT.. before the gate reads them back: identical values from every
# column tile of a row block (the same loads and dots), so no tile waits for another.


@triton.jit(do_not_specialize=["seed"])
def _gemm_kernel(
    a1_ptr, b1_ptr, b1x_ptr, a2_ptr, b2_ptr, a3_ptr, b3_ptr, bias_ptr, cin_ptr, c_ptr, c2_ptr, idx_ptr,
    h_ptr, tp_ptr, meta_ptr, scale_ptr,
    M, N, K1, K2, K3, N_SPLIT, M_SPLIT, K_SPLIT, GATE_Q, GATE_R, seed,
    stride_a1m, stride_a1k, stride_b1n, stride_b1k, stride_b1xn, stride_b1xk,
    stride_a2m, stride_a2k, stride_b2n, stride_b2k,
    stride_a3m, stride_a3k, stride_b3n, stride_b3k,
    stride_cinm, stride_cinn, stride_cm, stride_cn, stride_c2m, stride_c2n, stride_hm,
    HAS_B1X: tl.constexpr, HAS_A2: tl.constexpr, HAS_A3: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_CIN: tl.constexpr, HAS_C2: tl.constexpr, ATOMIC: tl.constexpr,
    IDX_A1: tl.constexpr, IDX_C: tl.constexpr, IDX_B1K: tl.constexpr,
    GATE: tl.constexpr, GATE_ROUTING: tl.constexpr, GATE_DROPOUT: tl.constexpr, K_PAD: tl.constexpr,
    ROUTER_ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
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
    if IDX_A1 or IDX_C:
        r_idx = tl.load(idx_ptr + rm).to(tl.int64)  # the tokens this tile's rows stand for
    if IDX_A1:
        ra1 = r_idx
    else:
        ra1 = rm
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_B1X:  # columns n >= N_SPLIT of the product read their B row from the second tensor
        in_x = rn >= N_SPLIT
        rn_b = tl.where(in_x, 0, rn)
        rn_x = tl.where(in_x, rn - N_SPLIT, 0)
    if ROUTER_ACC:  # a plugin wider than a tile: every column tile also computes its rows' k router logits
        k_q = tl.load(meta_ptr + 6 * GATE_Q + 3)
        offs_e = tl.arange(0, K_PAD)
        e_ok = offs_e < k_q
        logits = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)

    # first operand pair, over this program's slice [k_lo, k_hi) of K1
    k_lo = pid_s * K_SPLIT
    k_hi = min(K1, k_lo + K_SPLIT)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_hi
        a = tl.load(a1_ptr + ra1[:, None] * stride_a1m + kk[None, :] * stride_a1k, mask=k_ok[None, :], other=0.0)
        if HAS_B1X:
            b = tl.load(b1_ptr + kk[:, None] * stride_b1k + rn_b[None, :] * stride_b1n,
                        mask=k_ok[:, None] & ~in_x[None, :], other=0.0).to(DOT_DTYPE)
            b += tl.load(b1x_ptr + kk[:, None] * stride_b1xk + rn_x[None, :] * stride_b1xn,
                         mask=k_ok[:, None] & in_x[None, :], other=0.0).to(DOT_DTYPE)
        elif IDX_B1K:
            kb = tl.load(idx_ptr + kk, mask=k_ok, other=0).to(tl.int64)
            b = tl.load(b1_ptr + kb[:, None] * stride_b1k + rn[None, :] * stride_b1n, mask=k_ok[:, None], other=0.0)
        else:
            b = tl.load(b1_ptr + kk[:, None] * stride_b1k + rn[None, :] * stride_b1n, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if ROUTER_ACC:
            w = tl.load(b1x_ptr + kk[:, None] * stride_b1xk + offs_e[None, :] * stride_b1xn,
                        mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            logits = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), logits, input_precision=PRECISION)

    # further operand pairs (the adapter's K columns), accumulated into the same tile
    if HAS_A2:
        for k0 in range(0, K2, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K2
            a = tl.load(a2_ptr + rm[:, None] * stride_a2m + kk[None, :] * stride_a2k, mask=k_ok[None, :], other=0.0)
            b = tl.load(b2_ptr + kk[:, None] * stride_b2k + rn[None, :] * stride_b2n, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_A3:
        for k0 in range(0, K3, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K3
            a = tl.load(a3_ptr + rm[:, None] * stride_a3m + kk[None, :] * stride_a3k, mask=k_ok[None, :], other=0.0)
            b = tl.load(b3_ptr + kk[:, None] * stride_b3k + rn[None, :] * stride_b3n, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)

    if IDX_C:
        m64 = r_idx
    else:
        m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    if HAS_CIN:
        acc += tl.load(cin_ptr + m64[:, None] * stride_cinm + n64[None, :] * stride_cinn, mask=c_mask).to(tl.float32)

    if HAS_C2:  # rows >= M_SPLIT go to the second output (of the same dtype): one pointer per element
        top = offs_m < M_SPLIT
        m_lo = tl.where(top, m64, 0)
        m_hi = tl.where(top, 0, m64 - M_SPLIT)
        ptrs = tl.where(top[:, None], c_ptr + m_lo[:, None] * stride_cm + n64[None, :] * stride_cn,
                        c2_ptr + m_hi[:, None] * stride_c2m + n64[None, :] * stride_c2n)
    else:
        ptrs = c_ptr + m64[:, None] * stride_cm + n64[None, :] * stride_cn
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=c_mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    if ROUTER_ACC:  # at columns N_SPLIT.. (every column tile of these rows stores the same values)
        tl.store(c_ptr + m64[:, None] * stride_cm + (N_SPLIT + offs_e).to(tl.int64)[None, :] * stride_cn, logits,
                 mask=(offs_m[:, None] < M) & e_ok[None, :])

    if GATE:  # the tile holds plugin GATE_Q's rank columns, its logits are stored: h = gate(UL) from the accumulator
        tl.debug_barrier()  # the logits just stored (by other threads of this program) are read back
        h = _gate_forward(acc, c_ptr, tp_ptr, meta_ptr, scale_ptr, offs_m, offs_n, M, stride_cm, GATE_Q, GATE_R,
                          seed, GATE_ROUTING, GATE_DROPOUT, K_PAD)
        tl.store(h_ptr + m64[:, None] * stride_hm + n64[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N_SPLIT))


# Tiles for H100 / H200 (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Large problems (the training
# shapes) choose among them by timing once per shape bucket; small ones (decode steps) use one
# fixed tile, and the interpreter a tiny one. Every tile here compiles without spills for every
# launch the tuner may give it (the compile gate, tests/test_kernel_compile.py, checks).
GEMM_TILES = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
# d[A; router] (fp32 atomic epilogue, M = R + K): larger tiles spill on sm_80 (24-2300 B) and
# 128x256 on sm_90 (176 B), so this launch has one tile
DAR_TILES = [(64, 64, 64, 4, 4)]
# rank-space outputs (UL: N = R + K) use tiles no wider than this
_RANK_SIDE_MAX = 128
# the gates run in the GEMM epilogues (``_forward_gate_in_epilogue``, ``_backward_gate_in_epilogue``)
# for plugins of at most this many experts (the compile gate checks 4 and 32)
EPILOGUE_MAX_EXPERTS = 32
# a plugin whose R_p + k_p columns fit one tile this wide (rounded up to a power of two) has them
# in one UL tile, logits included (``_gate_spans_tile``); the rank tiles of a wider one each
# recompute its logits (ROUTER_ACC)
GATE_EPILOGUE_MAX = _RANK_SIDE_MAX
# launches reading or writing rows through a token index (grouped plugins) keep the indices live
# over the K loop: 128x256 spills 40-312 B on sm_80 there (the compile gate), so they stop at 128x128
_INDEXED_TILE_MAX = 128 * 128
_SMALL_PROBLEM = 2**30  # M * N * K below this (about 1 GFLOP, microseconds on an H100): fixed tile
_SPLIT_ALIGN = 16 if INTERPRET else 256  # slices of a split K axis: a multiple of every BLOCK_K


def _tile(bm, bn, bk, warps, stages, group_m=8):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)


def _gemm_tiles(M, N, K, n_cap=None, tiles=GEMM_TILES):
    if INTERPRET:  # small tiles: several tiles and K steps even on the tests' tiny shapes
        return [_tile(16, 16, 16, 4, 1, group_m=2)]
    if M * N * K < _SMALL_PROBLEM:  # decode steps: 16 rows, K 32, 2 stages (K 64 spilled 8-32 B in ptxas)
        return [_tile(16, 64, 32, 4, 2) if M <= 16 else _tile(64, 64, 64, 4, 3)]
    m_cap = max(32, triton.next_power_of_2(M))
    n_cap = min(n_cap or 1 << 30, max(32, triton.next_power_of_2(N)))
    kept = [_tile(*t) for t in tiles if t[0] <= m_cap and t[1] <= n_cap]
    return kept or [_tile(*tiles[-1])]


_NUM_SMS: dict = {}


def _split_for(M: int, N: int, tokens_bucket: int, device: torch.device) -> int:
    """Programs sharing one output tile's K (token) axis: about two waves of SMs when M x N is small.
    A function of the token bucket, not of T, so it is part of the tuning key's bucket."""
    if INTERPRET:
        return 3 if tokens_bucket >= 128 else 1  # the tests' larger cases exercise the atomic split
    if device.type != "cuda":
        sms = 132
    else:
        if device not in _NUM_SMS:
            _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        sms = _NUM_SMS[device]
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    return max(1, min(2 * sms // tiles, tokens_bucket // 512))


@dataclasses.dataclass(frozen=True)
class Gate:
    """Plugin ``q``'s gate run in a kernel's epilogue (``gemm(..., gate=, h=)``, ``dh_db(..., gate=,
    ul=)``): its row of the gate table ``meta`` / ``scale`` (``_plugin_meta``), its expert count,
    the routing tensor (stacked plugins, else None), the dropout stream's row width and seed."""

    meta: torch.Tensor
    scale: torch.Tensor
    q: int
    experts: int
    token_plugin: Optional[torch.Tensor]
    R: int
    seed: int
    dropout: bool

    def args(self):
        return dict(tp_ptr=self.token_plugin if self.token_plugin is not None else self.meta, meta_ptr=self.meta,
                    scale_ptr=self.scale, GATE_Q=self.q, GATE_R=self.R, seed=self.seed)

    def consts(self):
        return dict(GATE=True, GATE_ROUTING=self.token_plugin is not None, GATE_DROPOUT=self.dropout,
                    K_PAD=_k_pad(self.experts))


_NO_GATE_CONSTS = dict(GATE=False, GATE_ROUTING=False, GATE_DROPOUT=False, K_PAD=2)


def _no_gate_args(dummy):
    return dict(tp_ptr=dummy, meta_ptr=dummy, scale_ptr=dummy, GATE_Q=0, GATE_R=0, seed=0)


def _gate_spans_tile(rank: int, experts: int) -> bool:
    """Whether one UL tile spans a plugin's R_p + k_p columns (else the tiles cover its ranks, ROUTER_ACC)."""
    return triton.next_power_of_2(rank + experts) <= GATE_EPILOGUE_MAX


def _forward_gate_in_epilogue(experts: int, dropout: float) -> bool:
    """Whether the UL GEMM writes h (no gate_fwd launch): not with dropout (its Philox tile spills, section 4)."""
    return dropout == 0 and experts <= EPILOGUE_MAX_EXPERTS


def _backward_gate_in_epilogue(experts: int) -> bool:
    """Whether the dy pass writes dUL (no fp32 dh, no gate_bwd launch; a plugin wider than one rank
    block adds a small ``gate_logits`` launch)."""
    return experts <= EPILOGUE_MAX_EXPERTS


def gemm(role, out, a1, b1, *, tokens, b1x=None, n_split=0, a2=None, b2=None, a3=None, b3=None, bias=None,
         cin=None, out2=None, atomic=False, dot_dtype, n_cap=None, tiles=GEMM_TILES, idx=None, idx_on=(), gate=None,
         h=None):
    """out[M, N] = a1 @ b1^T (+ a2 @ b2^T) (+ a3 @ b3^T) (+ bias) (+ cin), any strides (pass
    transposed views freely). ``b1x``: rows n >= n_split of B1 are ``b1x[n - n_split]``. ``out2``:
    rows m >= out.shape[0] of the product go to ``out2[m - out.shape[0]]``. ``atomic``: the
    outputs are float32 accumulators (zeroed by the caller) and K1, the token axis, is split over
    programs that add their partial tiles atomically. ``tokens``: the token count, for the tuning
    key's bucket. Products in ``dot_dtype``, accumulation in float32.
    ``idx`` (int32, one token index per product row, or per K1 step for ``"b1k"``) with ``idx_on``
    naming what it indexes: ``"a1"`` (A1's rows), ``"c"`` (the rows of out and cin), ``"b1k"``
    (B1's K index): one plugin's row segment of a grouped batch; M (or K1) is then ``len(idx)``.
    ``gate`` (a ``Gate``): out is one plugin's UL = x [A_p; router_p]^T (float32, n_split = R_p,
    contiguous rows) and the epilogue also writes h = gate(UL) into ``h`` [M, R_p] (one tile spans
    all N columns, or, for a wider plugin, the tiles cover its R_p ranks and each recomputes its
    rows' logits: ROUTER_ACC)."""
    if (idx is None) != (not idx_on) or not set(idx_on) <= {"a1", "c", "b1k"}:
        raise ValueError(f"idx_on={idx_on!r} needs an index tensor and names only a1, c, b1k")
    if gate is not None and (h is None or out.dtype != torch.float32 or out.stride(1) != 1 or b1x is None
                             or atomic or out2 is not None or "c" in idx_on or a2 is not None or bias is not None
                             or cin is not None):
        raise ValueError("a gate epilogue needs h and writes one plugin's float32 UL = x [A; router]^T alone")
    # a plugin wider than one tile: the tiles cover its rank columns, each with its rows' logits
    router_acc = gate is not None and not _gate_spans_tile(n_split, out.shape[1] - n_split)
    m_split = out.shape[0] if "c" not in idx_on else idx.shape[0]
    if out2 is not None and "c" in idx_on:
        raise ValueError("a row-split output is never written through an index")
    M = m_split + (out2.shape[0] if out2 is not None else 0)
    N = out.shape[1] if not router_acc else n_split
    K1 = a1.shape[1] if "b1k" not in idx_on else idx.shape[0]
    if "a1" in idx_on and M != idx.shape[0]:
        raise ValueError(f"{M} product rows but {idx.shape[0]} token indices")
    K2 = a2.shape[1] if a2 is not None else 0
    K3 = a3.shape[1] if a3 is not None else 0
    if out2 is not None and out2.dtype != out.dtype:
        raise ValueError("the two outputs of a row-split GEMM must share a dtype")
    if M == 0 or N == 0:
        return
    dev = a1.device
    bucket = tuning.token_bucket(tokens)
    split = 1
    if atomic:
        assert a2 is None and a3 is None and cin is None and bias is None
        split = max(1, min(_split_for(M, N, bucket, dev), triton.cdiv(K1, _SPLIT_ALIGN)))
    k_split = triton.cdiv(triton.cdiv(max(K1, 1), split), _SPLIT_ALIGN) * _SPLIT_ALIGN if split > 1 else max(K1, 1)
    split = triton.cdiv(max(K1, 1), k_split)
    if K1 + K2 + K3 == 0:
        return

    def strides(t, n=2):
        return (t.stride(0), t.stride(1)) if t is not None else (0,) * n

    dummy = a1
    args = dict(
        a1_ptr=a1, b1_ptr=b1, b1x_ptr=b1x if b1x is not None else dummy,
        a2_ptr=a2 if a2 is not None else dummy, b2_ptr=b2 if b2 is not None else dummy,
        a3_ptr=a3 if a3 is not None else dummy, b3_ptr=b3 if b3 is not None else dummy,
        bias_ptr=bias if bias is not None else dummy, cin_ptr=cin if cin is not None else dummy,
        c_ptr=out, c2_ptr=out2 if out2 is not None else out, idx_ptr=idx if idx is not None else dummy,
        h_ptr=h if gate is not None else dummy,
        **(gate.args() if gate is not None else _no_gate_args(dummy)),
        M=M, N=N, K1=K1, K2=K2, K3=K3, N_SPLIT=n_split, M_SPLIT=m_split, K_SPLIT=k_split,
    )
    names = ["a1", "b1", "b1x", "a2", "b2", "a3", "b3", "cin", "c", "c2"]
    tensors = [a1, b1, b1x, a2, b2, a3, b3, cin, out, out2 if out2 is not None else out]
    for name, t in zip(names, tensors):
        first, second = ("m", "k") if name[0] == "a" else ("n", "k") if name[0] == "b" else ("m", "n")
        s = strides(t)
        args[f"stride_{name}{first}"], args[f"stride_{name}{second}"] = s
    args["stride_hm"] = h.stride(0) if gate is not None else 0
    args = {name: args[name] for name in _gemm_kernel.arg_names if name in args}  # the kernel's order
    consts = dict(
        HAS_B1X=b1x is not None, HAS_A2=a2 is not None, HAS_A3=a3 is not None, HAS_BIAS=bias is not None,
        HAS_CIN=cin is not None, HAS_C2=out2 is not None, ATOMIC=atomic,
        IDX_A1="a1" in idx_on, IDX_C="c" in idx_on, IDX_B1K="b1k" in idx_on,
        **(gate.consts() if gate is not None else _NO_GATE_CONSTS), ROUTER_ACC=router_acc,
        DOT_DTYPE=tl.float32 if INTERPRET else _TL_DTYPE[dot_dtype],
        PRECISION="ieee" if (INTERPRET or dot_dtype == torch.float32) else "tf32",
    )
    if router_acc:  # the logits' tile is an operand of tl.dot: at least 16 wide
        consts["K_PAD"] = max(16, consts["K_PAD"])

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)

    def reset():
        out.zero_()
        if out2 is not None:
            out2.zero_()

    # the token dimension of the key is bucketed; the rest is the exact shape
    shape = (M, N) if atomic else (N, K1)  # the token axis: K1 for weight gradients, M otherwise
    flags = (b1x is not None, a2 is not None, a3 is not None, bias is not None, cin is not None, atomic,
             "a1" in idx_on, "c" in idx_on, "b1k" in idx_on)
    if gate is not None:
        flags += (True, gate.token_plugin is not None, gate.dropout, gate.experts, router_acc)
    key = (bucket, *shape, K2, K3, str(dot_dtype), str(out.dtype), *map(int, flags), split)
    if idx is not None:
        tiles = [t for t in tiles if t[0] * t[1] <= _INDEXED_TILE_MAX] or tiles[-1:]
    if gate is None:
        candidates = _gemm_tiles(M, N, K1 + K2 + K3, n_cap, tiles)
    else:  # the tiles that do not spill with the gate epilogue (``_gate_gemm_tiles``, section 4: why there)
        candidates = _gate_gemm_tiles(M, N, router_acc)
    _run(Launch(role, _gemm_kernel, grid, args, consts, candidates, key, reset if atomic else None))


# ----------------------------------------------------------------------------------------------
# 2. dh = dy @ B and dB = dy^T @ h in one pass over dy
# ----------------------------------------------------------------------------------------------
# Grid: token blocks x rank chunks (rank chunk fastest, so the programs reading one dy block run
# together and share it in L2). Each program keeps its [BLOCK_T, BLOCK_R] block of dh in registers
# over the whole N loop (no split, no partials) and adds each [BLOCK_N, BLOCK_R] product dy^T h into
# the float32 dB accumulator with atomics (dB, N x R floats, stays in L2). With ``GATE`` (one
# plugin's B and h, section 3) the epilogue turns the dh block into dUL (``_gate_backward``) instead
# of storing dh: the plugin's dlogits too when one rank block holds all its ranks, else (``PARTIAL``)
# the block's share of the per-expert sums, slot pid_r of ``dg``.


@triton.jit(do_not_specialize=["seed"])
def _dh_db_kernel(
    dy_ptr, b_ptr, h_ptr, dh_ptr, db_ptr, idx_ptr, ul_ptr, dg_ptr, tp_ptr, meta_ptr, scale_ptr,
    T, N, R, GATE_Q, GATE_R, seed,
    stride_dyt, stride_dyn, stride_bn, stride_br, stride_h, stride_dh, stride_db, stride_ul, stride_dgc, stride_dgt,
    HAS_DB: tl.constexpr, IDX_DY: tl.constexpr,
    GATE: tl.constexpr, GATE_ROUTING: tl.constexpr, GATE_DROPOUT: tl.constexpr, K_PAD: tl.constexpr,
    PARTIAL: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    num_r = tl.cdiv(R, BLOCK_R)
    pid = tl.program_id(0)
    pid_t = pid // num_r
    pid_r = pid % num_r
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ok = offs_t < T
    r_ok = offs_r < R
    t64 = offs_t.to(tl.int64)
    if IDX_DY:  # grouped plugins: dy's rows are this segment's tokens
        t_dy = tl.load(idx_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)
    else:
        t_dy = t64
    if HAS_DB:
        h = tl.load(h_ptr + t64[:, None] * stride_h + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        h = h.to(DOT_DTYPE)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        n64 = offs_n.to(tl.int64)
        dy = tl.load(dy_ptr + t_dy[:, None] * stride_dyt + n64[None, :] * stride_dyn,
                     mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptr + n64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(dy, b, acc, input_precision=PRECISION)
        if HAS_DB:
            part = tl.dot(tl.trans(dy), h, input_precision=PRECISION)
            tl.atomic_add(db_ptr + n64[:, None] * stride_db + offs_r[None, :], part,
                          mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    if GATE:  # plugin GATE_Q's rank columns: dh goes straight to dUL (dh_ptr), dg shares to slot pid_r
        _gate_backward(acc, ul_ptr, dh_ptr, dg_ptr + pid_r.to(tl.int64) * stride_dgc, tp_ptr, meta_ptr, scale_ptr,
                       offs_t, offs_r, T, stride_ul, stride_dh, stride_dgt, GATE_Q, GATE_R, seed, GATE_ROUTING,
                       GATE_DROPOUT, K_PAD, PARTIAL)
    else:
        tl.store(dh_ptr + t64[:, None] * stride_dh + offs_r[None, :], acc, mask=t_ok[:, None] & r_ok[None, :])


DH_DB_TILES = [  # (BLOCK_T, BLOCK_N, BLOCK_R cap, warps, stages); BLOCK_T 256 / BLOCK_R 64 spill on sm_80
    (128, 64, 128, 8, 3),
    (128, 32, 128, 8, 3),
    (64, 64, 64, 4, 3),
]
# dh_db_gate: a plugin's rank columns in blocks of at most this many (PARTIAL past one block; the
# tests lower it to reach that path with small ranks)
GATE_BLOCK_R = 64
GATE_DH_DB_TILES = [(128, 64, 8, 3), (128, 32, 8, 3)]  # (BLOCK_T, BLOCK_N, warps, stages)


def _dh_db_tiles(T, R, gate=False):
    """Candidate tiles; ``gate``: every tile has the same rank block, GATE_BLOCK_R at most (the number
    of dg shares a PARTIAL gate leaves does not depend on the tile)."""
    r_pow = max(16, triton.next_power_of_2(R))
    if gate:
        r_block = min(r_pow, GATE_BLOCK_R)
        if INTERPRET or T <= 64:
            return [dict(BLOCK_T=16, BLOCK_N=16 if INTERPRET else 64, BLOCK_R=r_block, num_warps=4,
                         num_stages=1 if INTERPRET else 3)]
        return [dict(BLOCK_T=bt, BLOCK_N=bn, BLOCK_R=r_block, num_warps=w, num_stages=st)
                for bt, bn, w, st in GATE_DH_DB_TILES]
    if INTERPRET:
        return [dict(BLOCK_T=16, BLOCK_N=16, BLOCK_R=min(r_pow, 16), num_warps=4, num_stages=1)]
    if T <= 64:
        return [dict(BLOCK_T=64 if T > 16 else 16, BLOCK_N=64, BLOCK_R=min(r_pow, 64), num_warps=4, num_stages=3)]
    tiles = [dict(BLOCK_T=bt, BLOCK_N=bn, BLOCK_R=min(r_pow, br), num_warps=w, num_stages=s)
             for bt, bn, br, w, s in DH_DB_TILES]
    return list({tile_name(t): t for t in tiles}.values())


def dh_db(dy, B, h, dh, db, *, dot_dtype, idx=None, gate=None, ul=None):
    """dh[T, R] = dy @ B (float32), and db[N, R] += dy^T @ h (float32 accumulator, zeroed by the
    caller) when ``db`` is given. ``idx`` [T] (grouped plugins): dy's rows are ``dy[idx]``.
    ``gate`` (a ``Gate``): B and h are one plugin's, and ``dh`` receives dUL = gate_backward(dh, UL)
    [T, R + k] (in its dtype) instead of dh, from ``ul`` [T, R + k] (float32): in the epilogue when
    one rank block holds all R columns, else each block leaves its share of the per-expert sums
    and ``_gate_logits_kernel`` (a second, small launch) writes dlogits."""
    T, N = dy.shape if idx is None else (idx.shape[0], dy.shape[1])
    R = B.shape[1]
    if T == 0 or R == 0:
        return
    if gate is not None and (ul is None or ul.stride(1) != 1 or dh.stride(1) != 1 or ul.dtype != torch.float32):
        raise ValueError("a gate epilogue reads a contiguous-row float32 UL and writes dUL rows")
    tiles = _dh_db_tiles(T, R, gate=gate is not None)
    blocks = triton.cdiv(R, tiles[0]["BLOCK_R"])  # rank blocks per row block (the same for every tile)
    partial = gate is not None and blocks > 1
    k_pad = gate.consts()["K_PAD"] if gate is not None else 2
    dg = _empty((blocks, T, k_pad), torch.float32, dy.device) if partial else dh

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(R, meta["BLOCK_R"]),)

    args = dict(dy_ptr=dy, b_ptr=B, h_ptr=h, dh_ptr=dh, db_ptr=db if db is not None else dh,
                idx_ptr=idx if idx is not None else dh, ul_ptr=ul if gate is not None else dh, dg_ptr=dg,
                **(gate.args() if gate is not None else _no_gate_args(dh)), T=T, N=N, R=R,
                stride_dyt=dy.stride(0), stride_dyn=dy.stride(1), stride_bn=B.stride(0), stride_br=B.stride(1),
                stride_h=h.stride(0), stride_dh=dh.stride(0), stride_db=db.stride(0) if db is not None else 0,
                stride_ul=ul.stride(0) if gate is not None else 0,
                stride_dgc=dg.stride(0) if partial else 0, stride_dgt=dg.stride(1) if partial else 0)
    args = {name: args[name] for name in _dh_db_kernel.arg_names if name in args}
    consts = dict(HAS_DB=db is not None, IDX_DY=idx is not None,
                  **(gate.consts() if gate is not None else _NO_GATE_CONSTS), PARTIAL=partial,
                  DOT_DTYPE=tl.float32 if INTERPRET else _TL_DTYPE[dot_dtype],
                  PRECISION="ieee" if (INTERPRET or dot_dtype == torch.float32) else "tf32")
    key = (tuning.token_bucket(T), N, R, str(dot_dtype), db is not None, idx is not None)
    if gate is not None:
        key += (True, gate.token_plugin is not None, gate.dropout, gate.experts, str(dh.dtype))
    _run(Launch("dh_db_gate" if gate is not None else "dh_db", _dh_db_kernel, grid, args, consts, tiles, key,
                (lambda: db.zero_()) if db is not None else None))
    if partial:
        _gate_logits(gate, ul, dg, dh, T)


# ----------------------------------------------------------------------------------------------
# 3. Rank-space gate: softmax over each plugin's experts, routing mask, scale, dropout
# ----------------------------------------------------------------------------------------------
# Grid: (token blocks, plugins). Program (i, q) owns plugin q's R_q rank columns and k_q logits for
# its block of rows, viewed as a [rows, k_q experts, r_q ranks] block (column r_off + e * r_q + j),
# and writes all of them: zeros for tokens routed elsewhere.
# meta[q] = (r_off, logit column, r_q, k_q, first row, rows) and scale[q] = (s_q, dropout
# probability of plugin q). Stacked plugins: every plugin spans all T rows (rows = INT32_MAX: up to
# T, the buffers' row count), its logits at column
# R + k_off, and the routing tensor says whose each token is. Grouped plugins: plugin q's rows are
# its segment (first row s_q, n_q rows, all its own), its ranks at column 0 and logits at R_q.
# Dropout draws from one Philox stream at offset row * R + column (R: the row width in ranks).
# ``_gate_forward`` / ``_gate_backward`` do the same per plugin in a GEMM epilogue (section 1's
# ``GATE``, section 2's): the tile's rank columns in registers, each column's expert logit read back
# from UL (the forward stores its logits first, then a barrier), the same ops in the same order. A
# plugin wider than the dy pass's rank block (``PARTIAL``) leaves one share of the per-expert sums
# per block; ``_gate_logits_kernel`` adds them up and writes dlogits.


@triton.jit
def _floored_exp(logits, z_max):
    """exp(logits - row max), with weights below exp(GATE_LOG_FLOOR) flushed to 0 (``router_gates``)."""
    z = logits - z_max[:, None]
    z = tl.where(z < GATE_LOG_FLOOR, float("-inf"), z)
    return tl.exp(z)


@triton.jit
def _plugin_softmax(ul_ptr, rows, t_ok, logit_col, k_q, K_PAD: tl.constexpr):
    """Unnormalised softmax weights [BLOCK_T, K_PAD] of the k_q logits at column ``logit_col`` of
    each row (``rows``: row offsets in elements), their row max and their sum ([BLOCK_T] each)."""
    offs_e = tl.arange(0, K_PAD)
    e_ok = offs_e < k_q
    logits = tl.load(ul_ptr + rows[:, None] + (logit_col + offs_e)[None, :], mask=t_ok[:, None] & e_ok[None, :],
                     other=0.0)
    z = tl.where(e_ok[None, :], logits, float("-inf"))
    z_max = tl.max(z, axis=1)
    p = _floored_exp(z, z_max)
    return p, z_max, tl.sum(p, axis=1)


@triton.jit
def _routed(tp_ptr, offs_t, t_ok, q):
    return tl.load(tp_ptr + offs_t, mask=t_ok, other=-1) == q


@triton.jit
def _load_plugin_gates(ul_ptr, tp_ptr, meta_ptr, offs_t, t_ok, rows, q,
                       HAS_ROUTING: tl.constexpr, K_PAD: tl.constexpr):
    """softmax of plugin q's logits for a block of tokens, 0 for tokens not routed to q: [BLOCK_T, K_PAD]."""
    logit_col = tl.load(meta_ptr + 6 * q + 1)
    k_q = tl.load(meta_ptr + 6 * q + 3)
    p, _, total = _plugin_softmax(ul_ptr, rows, t_ok, logit_col, k_q, K_PAD)
    g = p / total[:, None]
    if HAS_ROUTING:
        g = tl.where(_routed(tp_ptr, offs_t, t_ok, q)[:, None], g, 0.0)
    return g  # without a routing tensor, every row of plugin q's range is its own


@triton.jit
def _column_gates(ul_ptr, tp_ptr, rows, offs_t, t_ok, cols, col_ok, logit_col, r_q, z_max, total, q,
                  HAS_ROUTING: tl.constexpr):
    """The gate of each rank column ``cols`` (plugin-local, 2-D): g[expert cols // r_q], the same
    arithmetic as ``_load_plugin_gates`` on each column's own expert logit (read back from UL)."""
    logit = tl.load(ul_ptr + rows[:, None] + logit_col + cols // r_q, mask=t_ok[:, None] & col_ok, other=float("-inf"))
    g = _floored_exp(logit, z_max) / total[:, None]
    if HAS_ROUTING:
        g = tl.where(_routed(tp_ptr, offs_t, t_ok, q)[:, None], g, 0.0)
    return g


@triton.jit
def _plugin(meta_ptr, scale_ptr, q):
    """Plugin q's row of ``_plugin_meta``'s tables: (first rank column, first logit column, rank per
    expert, experts, first row, scale, dropout p)."""
    row = meta_ptr + 6 * q
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(scale_ptr + 2 * q), tl.load(scale_ptr + 2 * q + 1))


@triton.jit
def _plugin_rows(meta_ptr, q, T, BLOCK_T: tl.constexpr):
    """This program's rows of plugin q (of the T rows of the buffers): (row indices, in-range mask)."""
    first = tl.load(meta_ptr + 6 * q + 4)
    n_rows = tl.load(meta_ptr + 6 * q + 5)
    offs_i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    return first + offs_i, (offs_i < n_rows) & (first + offs_i < T)


@triton.jit
def _dropout_factor(seed, offsets, p_drop):
    """Philox keep mask scaled by 1 / (1 - p) at stream ``offsets`` (row * R + rank column)."""
    rnd = tl.rand(seed, offsets)
    return tl.where(rnd >= p_drop, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit
def _gate_forward(acc, ul_ptr, tp_ptr, meta_ptr, scale_ptr, offs_m, offs_n, M, stride_ul, q, R, seed,
                  HAS_ROUTING: tl.constexpr, HAS_DROPOUT: tl.constexpr, K_PAD: tl.constexpr):
    """h for a UL GEMM tile (``acc`` [BLOCK_M, BLOCK_N] = plugin q's columns of UL, already stored at
    ``ul_ptr``, rows ``offs_m``): ``_gate_fwd_kernel``'s values and dropout stream, in the epilogue."""
    r_off, logit_col, r_q, k_q, first, s_q, p_drop = _plugin(meta_ptr, scale_ptr, q)
    t_ok = offs_m < M
    rows = offs_m.to(tl.int64) * stride_ul
    _, z_max, total = _plugin_softmax(ul_ptr, rows, t_ok, logit_col, k_q, K_PAD)
    g = _column_gates(ul_ptr, tp_ptr, rows, offs_m, t_ok, offs_n[None, :], (offs_n < r_q * k_q)[None, :], logit_col,
                      r_q, z_max, total, q, HAS_ROUTING)
    h = acc * (g * s_q)
    if HAS_DROPOUT:
        h = h * _dropout_factor(seed, (first + offs_m)[:, None] * R + (r_off + offs_n)[None, :], p_drop)
    return h


@triton.jit
def _gate_backward(dh, ul_ptr, dul_ptr, dg_ptr, tp_ptr, meta_ptr, scale_ptr, offs_t, offs_r, T, stride_ul, stride_dul,
                   stride_dg, q, R, seed, HAS_ROUTING: tl.constexpr, HAS_DROPOUT: tl.constexpr, K_PAD: tl.constexpr,
                   PARTIAL: tl.constexpr):
    """dUL from a dh block of plugin q's rank columns ``offs_r`` (``_gate_bwd_kernel``'s math, in the
    dy pass's epilogue): du = dh s m g[e] and dlogits = g (dg - sum_e g dg), dg[e] = sum over
    expert e's columns of dh s m u. A block holding all of the plugin's columns writes dlogits;
    with ``PARTIAL`` (a plugin wider than the block) it writes its share of dg to ``dg_ptr`` (rows
    of this block's slot) and ``_gate_logits_kernel`` adds the shares up."""
    r_off, logit_col, r_q, k_q, first, s_q, p_drop = _plugin(meta_ptr, scale_ptr, q)
    t_ok = offs_t < T
    t64 = offs_t.to(tl.int64)
    rows = t64 * stride_ul
    col_ok = offs_r < r_q * k_q
    mask = t_ok[:, None] & col_ok[None, :]
    p, z_max, total = _plugin_softmax(ul_ptr, rows, t_ok, logit_col, k_q, K_PAD)
    g_col = _column_gates(ul_ptr, tp_ptr, rows, offs_t, t_ok, offs_r[None, :], col_ok[None, :], logit_col, r_q, z_max,
                          total, q, HAS_ROUTING)
    u = tl.load(ul_ptr + rows[:, None] + offs_r[None, :], mask=mask, other=0.0)
    if HAS_DROPOUT:
        sm = s_q * _dropout_factor(seed, (first + offs_t)[:, None] * R + (r_off + offs_r)[None, :], p_drop)
    else:
        sm = s_q
    dsm = dh * sm
    tl.store(dul_ptr + t64[:, None] * stride_dul + offs_r[None, :], (dsm * g_col).to(dul_ptr.dtype.element_ty),
             mask=mask)
    prod = dsm * u  # zero past the plugin's columns (u is loaded as 0 there)
    expert = offs_r // r_q
    offs_e = tl.arange(0, K_PAD)
    dg = tl.zeros((dh.shape[0], K_PAD), dtype=tl.float32)
    for e in range(tl.min(offs_r, axis=0) // r_q, tl.minimum(k_q, tl.max(offs_r, axis=0) // r_q + 1)):
        dg_e = tl.sum(tl.where((expert == e)[None, :], prod, 0.0), axis=1)  # the experts this block touches
        dg = tl.where(offs_e[None, :] == e, dg_e[:, None], dg)
    e_mask = t_ok[:, None] & (offs_e < k_q)[None, :]
    if PARTIAL:
        tl.store(dg_ptr + t64[:, None] * stride_dg + offs_e[None, :], dg, mask=e_mask)
    else:
        g = p / total[:, None]
        if HAS_ROUTING:
            g = tl.where(_routed(tp_ptr, offs_t, t_ok, q)[:, None], g, 0.0)
        _store_dlogits(g, dg, dul_ptr + t64[:, None] * stride_dul + (logit_col + offs_e)[None, :], e_mask)


@triton.jit
def _store_dlogits(g, dg, ptrs, mask):
    """The softmax backward: dlogits = g (dg - sum_e g dg), [BLOCK_T, K_PAD]."""
    tl.store(ptrs, (g * (dg - tl.sum(g * dg, axis=1)[:, None])).to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _gate_logits_kernel(
    ul_ptr, dg_ptr, tp_ptr, meta_ptr, dul_ptr,
    T, BLOCKS, GATE_Q, stride_ul, stride_dgc, stride_dgt, stride_dul,
    HAS_ROUTING: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dlogits of plugin GATE_Q from the BLOCKS shares of dg its dy pass left (``_gate_backward``, PARTIAL)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    t64 = offs_t.to(tl.int64)
    logit_col = tl.load(meta_ptr + 6 * GATE_Q + 1)
    k_q = tl.load(meta_ptr + 6 * GATE_Q + 3)
    g = _load_plugin_gates(ul_ptr, tp_ptr, meta_ptr, offs_t, t_ok, t64 * stride_ul, GATE_Q, HAS_ROUTING, K_PAD)
    offs_e = tl.arange(0, K_PAD)
    mask = t_ok[:, None] & (offs_e < k_q)[None, :]
    dg = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    shares = dg_ptr + t64[:, None] * stride_dgt + offs_e[None, :]
    for _ in range(0, BLOCKS):
        dg += tl.load(shares, mask=mask, other=0.0)
        shares += stride_dgc
    _store_dlogits(g, dg, dul_ptr + t64[:, None] * stride_dul + (logit_col + offs_e)[None, :], mask)


@triton.jit(do_not_specialize=["seed"])
def _gate_fwd_kernel(
    ul_ptr, tp_ptr, meta_ptr, scale_ptr, h_ptr,
    T, R, stride_ul, stride_h, seed,
    HAS_ROUTING: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
):
    q = tl.program_id(1)
    r_off, _, r_q, k_q, _, s_q, p_drop = _plugin(meta_ptr, scale_ptr, q)
    offs_t, t_ok = _plugin_rows(meta_ptr, q, T, BLOCK_T)
    rows = offs_t.to(tl.int64) * stride_ul
    g = _load_plugin_gates(ul_ptr, tp_ptr, meta_ptr, offs_t, t_ok, rows, q, HAS_ROUTING, K_PAD)
    g3 = (g * s_q)[:, :, None]

    offs_e = tl.arange(0, K_PAD)
    for j0 in range(0, r_q, R_CHUNK):
        offs_j = j0 + tl.arange(0, R_CHUNK)
        col = r_off + offs_e[:, None] * r_q + offs_j[None, :]  # [K_PAD, R_CHUNK]
        mask = t_ok[:, None, None] & ((offs_e[:, None] < k_q) & (offs_j[None, :] < r_q))[None, :, :]
        u = tl.load(ul_ptr + rows[:, None, None] + col[None, :, :], mask=mask, other=0.0)
        h = u * g3
        if HAS_DROPOUT:
            h = h * _dropout_factor(seed, offs_t[:, None, None] * R + col[None, :, :], p_drop)
        h_ptrs = h_ptr + offs_t.to(tl.int64)[:, None, None] * stride_h + col[None, :, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _gate_bwd_kernel(
    ul_ptr, dh_ptr, tp_ptr, meta_ptr, scale_ptr, dul_ptr,
    T, R, stride_ul, stride_dh, stride_dul, seed,
    HAS_ROUTING: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
):
    # h = s * u * m * g[e] (m: dropout factor), so du = dh * s * m * g[e],
    # dg[e] = sum_j dh * s * u * m, and dlogits = g * (dg - sum_e g * dg) (softmax backward).
    q = tl.program_id(1)
    r_off, logit_col, r_q, k_q, _, s_q, p_drop = _plugin(meta_ptr, scale_ptr, q)
    offs_t, t_ok = _plugin_rows(meta_ptr, q, T, BLOCK_T)
    t64 = offs_t.to(tl.int64)
    rows = t64 * stride_ul
    g = _load_plugin_gates(ul_ptr, tp_ptr, meta_ptr, offs_t, t_ok, rows, q, HAS_ROUTING, K_PAD)
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
            sm = s_q * _dropout_factor(seed, offs_t[:, None, None] * R + col[None, :, :], p_drop)
        else:
            sm = s_q
        dsm = dh * sm
        tl.store(dul_ptr + t64[:, None, None] * stride_dul + col[None, :, :], (dsm * g3).to(dul_ptr.dtype.element_ty), mask=mask)
        dg += tl.sum(dsm * u, axis=2)

    dlogits = g * (dg - tl.sum(g * dg, axis=1)[:, None])
    dl_ptrs = dul_ptr + t64[:, None] * stride_dul + (logit_col + offs_e)[None, :]
    tl.store(dl_ptrs, dlogits.to(dul_ptr.dtype.element_ty), mask=t_ok[:, None] & (offs_e < k_q)[None, :])


def _gate_logits(gate, ul, dg, dul, T):
    """``_gate_logits_kernel`` for the T rows of plugin ``gate.q`` (dg: [blocks, T, K_PAD] shares)."""
    args = dict(ul_ptr=ul, dg_ptr=dg, tp_ptr=gate.args()["tp_ptr"], meta_ptr=gate.meta, dul_ptr=dul, T=T,
                BLOCKS=dg.shape[0], GATE_Q=gate.q, stride_ul=ul.stride(0), stride_dgc=dg.stride(0),
                stride_dgt=dg.stride(1), stride_dul=dul.stride(0))
    tile = dict(BLOCK_T=16 if INTERPRET else 64, num_warps=4, num_stages=1)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]),)

    consts = dict(HAS_ROUTING=gate.token_plugin is not None, K_PAD=dg.shape[2])
    args = {name: args[name] for name in _gate_logits_kernel.arg_names if name in args}
    _run(Launch("gate_logits", _gate_logits_kernel, grid, args, consts, [tile], ()))


_META_CACHE: dict = {}


_META_CACHE_SIZE = 256  # grouped tables depend on the batch's counts: the least recently built go first


def _plugin_meta(ranks, experts, scales, dropouts, device, counts=None, only=None):
    """The gate kernels' per-plugin table (section comment) as int32 [P, 6] and (scale, dropout) as
    float32 [P, 2], cached per device (no host-to-device copy after the first call). ``counts``:
    grouped plugins, each plugin's rows; None: stacked. ``only``: the rows of these plugins alone
    (grouped plugins whose gates do not run in an epilogue)."""
    key = (ranks, experts, scales, dropouts, device, counts, only)
    if key not in _META_CACHE:
        if len(_META_CACHE) >= _META_CACHE_SIZE:
            _META_CACHE.pop(next(iter(_META_CACHE)))
        rows, r_off, k_off, first, R = [], 0, 0, 0, sum(ranks)
        for p, (R_p, k_p) in enumerate(zip(ranks, experts)):
            if counts is None:  # stacked
                rows.append((r_off, R + k_off, R_p // k_p, k_p, 0, 2**31 - 1))
            else:
                rows.append((0, R_p, R_p // k_p, k_p, first, counts[p]))
                first += counts[p]
            r_off, k_off = r_off + R_p, k_off + k_p
        kept = range(len(ranks)) if only is None else only
        meta = torch.tensor([rows[p] for p in kept], dtype=torch.int32, device=device)
        scale = torch.tensor([(scales[p], dropouts[p]) for p in kept], dtype=torch.float32, device=device)
        _META_CACHE[key] = (meta, scale)
    return _META_CACHE[key]


GATE_BLOCK_ELEMENTS = 2048  # [tokens, k, r] elements per program and rank chunk: no spills (compile gate)


def _k_pad(experts: int) -> int:
    return max(2, triton.next_power_of_2(experts))


def _gate_tile(ranks, experts):
    """BLOCK_T, K_PAD, R_CHUNK and warps for the gate kernels."""
    k_pad = _k_pad(max(experts))
    r_max = max(R_p // k_p for R_p, k_p in zip(ranks, experts))
    if INTERPRET:  # small chunks, so the tests exercise the token-block and rank-chunk loops
        return dict(BLOCK_T=4, K_PAD=k_pad, R_CHUNK=2, num_warps=4, num_stages=1)
    r_chunk = max(2, min(triton.next_power_of_2(r_max), 256 // k_pad))
    block_t = max(2, min(64, GATE_BLOCK_ELEMENTS // (k_pad * r_chunk)))
    return dict(BLOCK_T=block_t, K_PAD=k_pad, R_CHUNK=r_chunk, num_warps=4, num_stages=1)


def _gate(role, kernel, args, T, rows, R, ranks, experts, dropouts, seed, token_plugin, meta, scale):
    """One launch over every plugin; ``T``: the buffers' rows, ``rows``: the most rows a plugin has
    (T when stacked), ``R``: the dropout stream's row width."""
    tile = _gate_tile(ranks, experts)
    args = dict(args, tp_ptr=token_plugin if token_plugin is not None else meta, meta_ptr=meta, scale_ptr=scale,
                R=R, seed=seed, T=T)
    ordered = {name: args[name] for name in kernel.arg_names if name in args}

    def grid(m):
        return (triton.cdiv(rows, m["BLOCK_T"]), len(ranks))

    consts = dict(HAS_ROUTING=token_plugin is not None, HAS_DROPOUT=max(dropouts) > 0)
    _run(Launch(role, kernel, grid, ordered, consts, [tile], ()))


def _grouped_gates(role, kernel, args, Tr, R, counts, ranks, experts, scales, dropouts, seed, in_epilogue):
    """One gate kernel launch over the segments of the grouped plugins whose gates are not in an
    epilogue (``in_epilogue(p)`` false); none when all are."""
    only = tuple(p for p, n in enumerate(counts) if n and not in_epilogue(p))
    if not only:
        return
    meta, scale = _plugin_meta(ranks, experts, scales, dropouts, args["ul_ptr"].device, counts=counts, only=only)
    pick = [ranks[p] for p in only], [experts[p] for p in only], [dropouts[p] for p in only]
    _gate(role, kernel, args, Tr, max(counts[p] for p in only), R, *pick, seed, None, meta, scale)


# The gate epilogue's tiles. ptxas (compile gate, 2026-12-02) on the UL GEMM with the gate
# epilogue at R=64 (64 + 4 and 64 + 32 columns in a 128-wide tile): 128x128 with 8 warps and 4
# stages has no spills without dropout (202-255 registers); 128x128 with 4 warps spilled 656-3220 B
# and 64x128 with 4 warps 12 B on sm_80 without dropout; with dropout (Philox on the whole tile)
# every tile of 64+ rows spilled 1.1-54 KB. The 16-row tile (decode steps) spills nowhere. So the
# forward epilogue runs only for plugins without dropout (``_forward_gate_in_epilogue``), at 128x128
# (8 warps) or 16x128. A wider plugin's rank tiles (ROUTER_ACC, 256 + 4 and 256 + 32): 128x128 and
# 64x128 with 8 warps spill nowhere (194-255 registers), 64x128 with 4 warps spilled 408 B on sm_80.
# dh_db_gate: 128-row blocks of 64 ranks (162-252 registers, no spills; a 64-row block spilled 192 B
# on sm_80, and every 128-rank block spilled 80-7200 B, with the gate tile held in registers twice
# as large), so a plugin of more than 64 ranks takes the PARTIAL path.
WIDE_GATE_TILES = [(128, 128, 64, 8, 4), (64, 128, 64, 8, 4)]


def _gate_gemm_tiles(M, N, router_acc=False):
    if router_acc:  # rank tiles, each with its rows' logits
        if INTERPRET:  # several column tiles on the tests' small ranks
            return [_tile(16, 16, 16, 4, 1, group_m=2)]
        return [_tile(16, 128, 32, 4, 2)] if M <= 16 else [_tile(*t) for t in WIDE_GATE_TILES]
    width = max(16, triton.next_power_of_2(N))
    if INTERPRET:
        return [_tile(16, width, 16, 4, 1, group_m=2)]
    return [_tile(16, width, 32, 4, 2) if M <= 16 else _tile(128, width, 64, 8, 4)]


def _check_launch(x, R, dropouts):
    if x.device.type not in ("cuda", "meta") and not INTERPRET:
        raise RuntimeError(
            "hlora.kernels: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before their "
            "first call to run (slowly) on the CPU; HLORA_BACKEND=torch avoids them."
        )
    if max(dropouts) > 0 and x.shape[0] * R >= 2**31:
        raise ValueError(f"dropout offsets (tokens x rank = {x.shape[0]} x {R}) overflow int32: split the batch")


# ----------------------------------------------------------------------------------------------
# 4. Launchers: the whole forward and the whole backward of one layer
# ----------------------------------------------------------------------------------------------


def _grad_accumulators(shapes, params, device):
    """Zeroed float32 accumulators of these shapes (the gradients of ``params``, in order) ->
    (flat, [accumulators]): views of one buffer ``flat`` (one zero fill) when every parameter is
    cast afterwards (none is float32); otherwise one buffer each and flat None, since the op's
    outputs may not alias each other."""
    if all(t.dtype != torch.float32 for t in params):
        sizes = [a * b for a, b in shapes]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        return flat, [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]
    return None, [torch.zeros(shape, dtype=torch.float32, device=device) for shape in shapes]


CAST_GROUP = 6  # gradients per cast_grads launch: two plugins' dA, dB and drouter


@triton.jit
def _cast_into(dst_ptr, v, offs, lo, hi):
    mine = (offs >= lo) & (offs < hi)
    tl.store(dst_ptr + (offs - lo), v.to(dst_ptr.dtype.element_ty), mask=mine)


@triton.jit
def _cast_grads_kernel(src_ptr, d0_ptr, d1_ptr, d2_ptr, d3_ptr, d4_ptr, d5_ptr, e0, e1, e2, e3, e4, e5,
                       BLOCK: tl.constexpr):
    """Float32 gradient accumulators (one buffer) cast to up to six gradients in one launch:
    gradient i is src[e_{i-1} : e_i] (e_{-1} = 0; an unused one has an empty range)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < e5)
    _cast_into(d0_ptr, v, offs, 0, e0)
    _cast_into(d1_ptr, v, offs, e0, e1)
    _cast_into(d2_ptr, v, offs, e1, e2)
    _cast_into(d3_ptr, v, offs, e2, e3)
    _cast_into(d4_ptr, v, offs, e3, e4)
    _cast_into(d5_ptr, v, offs, e4, e5)


def _cast_grads(flat, accs, params):
    """The gradients in their parameters' dtypes from the float32 accumulators ``accs`` (views of
    ``flat``, in its order): one launch per six gradients; without ``flat`` (some parameter is
    float32) a cast each, none for float32."""
    if flat is None:
        return [g.to(p.dtype) for g, p in zip(accs, params)]  # no copy for float32
    outs = [_empty(p.shape, p.dtype, p.device) for p in params]
    start = 0
    for i in range(0, len(outs), CAST_GROUP):
        group = outs[i : i + CAST_GROUP]
        ends = list(itertools.accumulate(g.numel() for g in accs[i : i + CAST_GROUP]))
        ends += [ends[-1]] * (CAST_GROUP - len(ends))
        group += [group[0]] * (CAST_GROUP - len(group))  # unused: empty ranges

        def grid(meta, n=ends[-1]):
            return (triton.cdiv(n, meta["BLOCK"]),)

        args = dict(src_ptr=flat[start:], **{f"d{j}_ptr": d for j, d in enumerate(group)},
                    **{f"e{j}": e for j, e in enumerate(ends)})
        _run(Launch("cast_grads", _cast_grads_kernel, grid, args, {}, [dict(BLOCK=1024, num_warps=4, num_stages=1)],
                    ()))
        start += ends[-1]
    return outs


def _choose_strategy(role, device, key, run):
    """'fused' or 'cublas' for the product ``role`` (y or dx): ``HLORA_STRATEGY``, else on CUDA the
    faster of the two, timed once per shape bucket and remembered with the tuning results."""
    name = strategy()
    if name != "auto":
        return name
    if INTERPRET or _recording is not None or device.type != "cuda":
        return "fused"
    return tuning.choose(f"strategy-{role}", device, key, ["fused", "cublas"], lambda s: _bench(lambda: run(s)))


def hlora_forward(x, weight, bias, y_base, A, B, router, token_plugin, ranks, experts, scales, dropouts, seed):
    """x [T, D] -> (y [T, N] in x.dtype, UL [T, R + K] float32, h [T, R] x.dtype); UL and h are views
    of buffers whose rows are padded to ``padded(R + K)`` and ``padded(R)`` elements.
    The base is ``weight`` [N, D] (+ ``bias``), or ``y_base`` [T, N], its output computed by the caller.
    ranks / experts / scales / dropouts: tuples, one entry per plugin; token_plugin: int32 [T] or None."""
    T, R, K = x.shape[0], sum(ranks), sum(experts)
    _check_launch(x, R, dropouts)
    dt, dev = x.dtype, x.device
    ul = _empty((T, padded(R + K)), torch.float32, dev)
    h = _empty((T, padded(R)), dt, dev)
    meta, scale = _plugin_meta(ranks, experts, scales, dropouts, dev)
    if len(ranks) == 1 and _forward_gate_in_epilogue(K, dropouts[0]):  # the gate in the UL GEMM's epilogue
        gate = Gate(meta, scale, 0, K, token_plugin, R, seed, dropouts[0] > 0)
        gemm("ul_gate", ul[:, : R + K], x, A, b1x=router, n_split=R, tokens=T, dot_dtype=dt, n_cap=_RANK_SIDE_MAX,
             gate=gate, h=h)
    else:  # stacked plugins (their columns are not adjacent), dropout, or more than 32 experts
        gemm("ul", ul[:, : R + K], x, A, b1x=router, n_split=R, tokens=T, dot_dtype=dt, n_cap=_RANK_SIDE_MAX)
        if T > 0:
            _gate("gate_fwd", _gate_fwd_kernel, dict(ul_ptr=ul, h_ptr=h, stride_ul=ul.stride(0), stride_h=h.stride(0)),
                  T, T, R, ranks, experts, dropouts, seed, token_plugin, meta, scale)
    hr = h[:, :R]
    N = B.shape[0]

    def y_product(how):
        if y_base is not None:  # the caller's base output: add the adapter into a copy
            y = _empty((T, N), dt, dev)
            gemm("y_adapter", y, hr, B, cin=y_base, tokens=T, dot_dtype=dt)
        elif how == "fused":
            y = _empty((T, N), dt, dev)
            gemm("y_fused", y, x, weight, a2=hr, b2=B, bias=bias, tokens=T, dot_dtype=dt)
        else:  # the adapter's product (+ bias) first, then cuBLAS accumulates the base into it (beta = 1)
            y = _empty((T, N), dt, dev)
            gemm("y_adapter", y, hr, B, bias=bias, tokens=T, dot_dtype=dt)
            y.addmm_(x, weight.t())
        return y

    how = "cublas" if y_base is not None else _choose_strategy(
        "y", dev, (tuning.token_bucket(T), N, x.shape[1], R, str(dt), bias is not None), y_product)
    return y_product(how), ul[:, : R + K], hr  # views of the padded buffers: no padding is handed out


def hlora_backward(dy, x, weight, A, B, router, token_plugin, ul, h, ranks, experts, scales, dropouts, seed,
                   need_dx=True, need_dw=True):
    """-> (dx [T, D] in x.dtype or None, dA, dB, drouter in their parameters' dtypes, or None).
    ``weight`` None: the base's dx is the caller's (autograd through its module): dx is the
    adapter's part only."""
    T, D = x.shape
    R, K = sum(ranks), sum(experts)
    N = B.shape[0]
    _check_launch(x, R, dropouts)
    dt, dev = x.dtype, x.device
    if need_dw:  # float32 accumulators, one zero fill when all three are cast at the end
        flat, (dA, dB, drouter) = _grad_accumulators([(R, D), (N, R), (K, D)], [A, B, router], dev)
    else:
        dA = dB = drouter = None
    dul = _empty((T, padded(R + K)), dt, dev)
    meta, scale = _plugin_meta(ranks, experts, scales, dropouts, dev)
    if len(ranks) == 1 and _backward_gate_in_epilogue(K):  # the gate backward in the dy pass's epilogue: no dh
        gate = Gate(meta, scale, 0, K, token_plugin, R, seed, dropouts[0] > 0)
        dh_db(dy, B, h, dul, dB, dot_dtype=dt, gate=gate, ul=ul)
    else:
        dh = _empty((T, padded(R)), torch.float32, dev)
        dh_db(dy, B, h, dh, dB, dot_dtype=dt)  # h: [T, R], rows padded
        if T > 0:
            _gate("gate_bwd", _gate_bwd_kernel,
                  dict(ul_ptr=ul, dh_ptr=dh, dul_ptr=dul, stride_ul=ul.stride(0), stride_dh=dh.stride(0),
                       stride_dul=dul.stride(0)),
                  T, T, R, ranks, experts, dropouts, seed, token_plugin, meta, scale)
    du, dl = dul[:, :R], dul[:, R : R + K]

    def dx_product(how):
        dx = _empty((T, D), dt, dev)
        if weight is None:
            gemm("dx_adapter", dx, du, A.t(), a2=dl, b2=router.t(), tokens=T, dot_dtype=dt)
        elif how == "fused":
            gemm("dx_fused", dx, dy, weight.t(), a2=du, b2=A.t(), a3=dl, b3=router.t(), tokens=T, dot_dtype=dt)
        else:
            gemm("dx_adapter", dx, du, A.t(), a2=dl, b2=router.t(), tokens=T, dot_dtype=dt)
            dx.addmm_(dy, weight)  # cuBLAS with beta = 1: no separate pass over dx
        return dx

    dx = None
    if need_dx:
        how = "cublas" if weight is None else _choose_strategy(
            "dx", dev, (tuning.token_bucket(T), N, D, R, str(dt)), dx_product)
        dx = dx_product(how)
    if need_dw:
        gemm("dar", dA, dul[:, : R + K].t(), x.t(), out2=drouter, atomic=True, tokens=T, dot_dtype=dt,
             tiles=DAR_TILES)
        dA, dB, drouter = _cast_grads(flat, (dA, dB, drouter), (A, B, router))
    return dx, dA, dB, drouter


# ----------------------------------------------------------------------------------------------
# 5. Grouped plugins: a mixed batch, each plugin's rank work on its own tokens only
# ----------------------------------------------------------------------------------------------
# ``order`` [T] (int32) lists the tokens sorted by plugin, the unrouted ones (-1) last, and
# ``counts`` (host ints) how many each plugin has: plugin p's segment is order[s_p : s_p + n_p].
# Per segment, the launches above run on that plugin's own tensors (A_p, B_p, router_p read where
# they live, never concatenated) with the token rows read and written through the segment's index.
# The rank-space buffers (UL, h, dh, dUL) are compact, in sorted order: row s_p + i is token
# order[s_p + i]; row width pad(max R_p + k_p) (UL, dUL) and pad(max R_p) (h, dh).


def _segments(counts):
    """(plugin, first row, rows) of each plugin with tokens in the batch."""
    out, start = [], 0
    for p, n in enumerate(counts):
        if n:
            out.append((p, start, n))
        start += n
    return out


def grouped_forward(x, weight, bias, y_base, As, Bs, routers, order, counts, ranks, experts, scales, dropouts, seed):
    """``hlora_forward`` for a mixed batch grouped by plugin (section comment above): x [T, D] ->
    (y [T, N] in x.dtype, UL [T_r, R_w + K_w] float32, h [T_r, R_w] x.dtype), T_r = sum(counts),
    R_w + K_w = max(R_p + k_p), R_w = max(R_p); plugin p's rows use their first R_p + k_p (R_p)
    columns. As / Bs / routers: one tensor per plugin."""
    T, dt, dev = x.shape[0], x.dtype, x.device
    Tr = sum(counts)
    width = max(r + k for r, k in zip(ranks, experts))
    r_width = max(ranks)
    _check_launch(x, r_width, dropouts)
    segs = _segments(counts)
    # a plugin narrower than the widest leaves columns of its rows unwritten: they hold zeros, so
    # that every element the op returns is defined (one memset; none when all widths are equal)
    alloc = _empty if len({r + k for r, k in zip(ranks, experts)}) == 1 else _zeros
    ul = alloc((Tr, padded(width)), torch.float32, dev)
    alloc = _empty if len(set(ranks)) == 1 else _zeros
    h = alloc((Tr, padded(r_width)), dt, dev)
    meta, scale = _plugin_meta(ranks, experts, scales, dropouts, dev, counts=counts)
    for p, s, n in segs:
        R_p, k_p = ranks[p], experts[p]
        idx = order[s : s + n]
        if _forward_gate_in_epilogue(k_p, dropouts[p]):
            gemm("ul_gate", ul[s : s + n, : R_p + k_p], x, As[p], b1x=routers[p], n_split=R_p, tokens=n, dot_dtype=dt,
                 n_cap=_RANK_SIDE_MAX, idx=idx, idx_on=("a1",),
                 gate=Gate(meta, scale, p, k_p, None, r_width, seed, dropouts[p] > 0), h=h[s : s + n])
        else:
            gemm("ul", ul[s : s + n, : R_p + k_p], x, As[p], b1x=routers[p], n_split=R_p, tokens=n, dot_dtype=dt,
                 n_cap=_RANK_SIDE_MAX, idx=idx, idx_on=("a1",))
    _grouped_gates("gate_fwd", _gate_fwd_kernel, dict(ul_ptr=ul, h_ptr=h, stride_ul=ul.stride(0), stride_h=h.stride(0)),
                   Tr, r_width, counts, ranks, experts, scales, dropouts, seed,
                   lambda p: _forward_gate_in_epilogue(experts[p], dropouts[p]))
    N = Bs[0].shape[0]
    rest = order[Tr:]  # the unrouted tokens: the base alone

    def y_product(how):
        if y_base is not None:  # the caller's base output: y = y_base (+ the adapter on routed rows)
            y = y_base.clone() if rest.shape[0] else _empty((T, N), dt, dev)
            for p, s, n in segs:
                gemm("y_adapter", y, h[s : s + n, : ranks[p]], Bs[p], cin=y if rest.shape[0] else y_base, tokens=n,
                     dot_dtype=dt, idx=order[s : s + n], idx_on=("c",))
        elif how == "fused":
            y = _empty((T, N), dt, dev)
            if rest.shape[0]:
                gemm("y_fused", y, x, weight, bias=bias, tokens=rest.shape[0], dot_dtype=dt, idx=rest,
                     idx_on=("a1", "c"))
            for p, s, n in segs:
                gemm("y_fused", y, x, weight, a2=h[s : s + n, : ranks[p]], b2=Bs[p], bias=bias, tokens=n, dot_dtype=dt,
                     idx=order[s : s + n], idx_on=("a1", "c"))
        else:  # each plugin's product (+ bias) on its rows, then cuBLAS accumulates the base (beta = 1)
            y = _empty((T, N), dt, dev)
            if rest.shape[0] and bias is not None:  # the unrouted rows start from the bias, or zero
                y.copy_(bias.expand(T, N))
            elif rest.shape[0]:
                y.zero_()
            for p, s, n in segs:
                gemm("y_adapter", y, h[s : s + n, : ranks[p]], Bs[p], bias=bias, tokens=n, dot_dtype=dt,
                     idx=order[s : s + n], idx_on=("c",))
            y.addmm_(x, weight.t())
        return y

    how = "cublas" if y_base is not None else _choose_strategy(
        "y", dev, (tuning.token_bucket(T), N, x.shape[1], "grouped", *ranks, str(dt), bias is not None),
        y_product)
    return y_product(how), ul[:, :width], h[:, :r_width]


def grouped_backward(dy, x, weight, As, Bs, routers, order, counts, ul, h, ranks, experts, scales, dropouts, seed,
                     need_dx=True, need_dw=True):
    """``hlora_backward`` for a mixed batch grouped by plugin -> (dx [T, D] or None, [dA_p], [dB_p],
    [drouter_p] in their parameters' dtypes, or None). ``weight`` None: dx is the adapter's part
    only (zero on unrouted tokens)."""
    T, D = x.shape
    N = dy.shape[1]
    dt, dev = x.dtype, x.device
    Tr = sum(counts)
    segs = _segments(counts)
    _check_launch(x, max(ranks), dropouts)
    separate = [p for p, _, _ in segs if not _backward_gate_in_epilogue(experts[p])]
    # dh only for the plugins whose gate backward is a kernel of its own
    dh = _empty((Tr, padded(max(ranks))), torch.float32, dev) if separate else None
    dul = _empty((Tr, padded(max(r + k for r, k in zip(ranks, experts)))), dt, dev)
    dAs = dBs = drouters = None
    if need_dw:
        params = [*As, *Bs, *routers]
        flat, accs = _grad_accumulators([*((r, D) for r in ranks), *((N, r) for r in ranks), *((k, D) for k in experts)],
                                        params, dev)
        P = len(ranks)
        dAs, dBs, drouters = accs[:P], accs[P : 2 * P], accs[2 * P :]
    meta, scale = _plugin_meta(ranks, experts, scales, dropouts, dev, counts=counts)
    for p, s, n in segs:
        R_p, k_p = ranks[p], experts[p]
        if p in separate:
            dh_db(dy, Bs[p], h[s : s + n, :R_p], dh[s : s + n, :R_p], dBs[p] if need_dw else None, dot_dtype=dt,
                  idx=order[s : s + n])
        else:
            dh_db(dy, Bs[p], h[s : s + n, :R_p], dul[s : s + n], dBs[p] if need_dw else None, dot_dtype=dt,
                  idx=order[s : s + n], gate=Gate(meta, scale, p, k_p, None, max(ranks), seed, dropouts[p] > 0),
                  ul=ul[s : s + n])
    if separate:
        _grouped_gates("gate_bwd", _gate_bwd_kernel,
                       dict(ul_ptr=ul, dh_ptr=dh, dul_ptr=dul, stride_ul=ul.stride(0), stride_dh=dh.stride(0),
                            stride_dul=dul.stride(0)),
                       Tr, max(ranks), counts, ranks, experts, scales, dropouts, seed, lambda p: p not in separate)
    rest = order[Tr:]

    def dx_product(how):
        fused = how == "fused" and weight is not None
        if fused:
            dx = _empty((T, D), dt, dev)
            if rest.shape[0]:
                gemm("dx_fused", dx, dy, weight.t(), tokens=rest.shape[0], dot_dtype=dt, idx=rest, idx_on=("a1", "c"))
        else:  # the adapter's part first: unrouted rows get none
            dx = torch.zeros((T, D), dtype=dt, device=dev) if rest.shape[0] else _empty((T, D), dt, dev)
        for p, s, n in segs:
            R_p, k_p = ranks[p], experts[p]
            idx, du, dl = order[s : s + n], dul[s : s + n, :R_p], dul[s : s + n, R_p : R_p + k_p]
            if fused:
                gemm("dx_fused", dx, dy, weight.t(), a2=du, b2=As[p].t(), a3=dl, b3=routers[p].t(), tokens=n,
                     dot_dtype=dt, idx=idx, idx_on=("a1", "c"))
            else:
                gemm("dx_adapter", dx, du, As[p].t(), a2=dl, b2=routers[p].t(), tokens=n, dot_dtype=dt, idx=idx,
                     idx_on=("c",))
        if weight is not None and not fused:
            dx.addmm_(dy, weight)  # cuBLAS with beta = 1
        return dx

    dx = None
    if need_dx:
        how = "cublas" if weight is None else _choose_strategy(
            "dx", dev, (tuning.token_bucket(T), N, D, "grouped", *ranks, str(dt)), dx_product)
        dx = dx_product(how)
    if need_dw:
        for p, s, n in segs:
            R_p, k_p = ranks[p], experts[p]
            gemm("dar", dAs[p], dul[s : s + n, : R_p + k_p].t(), x.t(), out2=drouters[p], atomic=True, tokens=n,
                 dot_dtype=dt, tiles=DAR_TILES, idx=order[s : s + n], idx_on=("b1k",))
        grads = _cast_grads(flat, [*dAs, *dBs, *drouters], params)
        dAs, dBs, drouters = grads[:P], grads[P : 2 * P], grads[2 * P :]
    return dx, dAs, dBs, drouters
