"""The one-launch decode kernel (``hlora.kernels.decode``, T <= 64) against an independent float64
reference: the MoELoRA mixture written expert by expert, ``y = W0 x + b + sum_p [token routed to p]
s_p sum_i g_pi B_pi A_pi x``. On a CPU the kernel runs in the Triton interpreter (set here before the
kernels are defined); outputs and the workspace start as NaN (``HLORA_KERNELS_POISON=1``)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("hlora.kernels.fused_linear", "hlora.kernels.decode"):
        _loaded = sys.modules.get(_name)
        if _loaded is not None and not _loaded.INTERPRET:
            importlib.reload(_loaded)

decode = importlib.import_module("hlora.kernels.decode")

pytestmark = pytest.mark.triton

DEV = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("HLORA_KERNELS_POISON", "1")
    decode._workspaces.clear()  # allocate (poisoned) per test


def moe_reference(x, W, b, A, B, router, ranks, experts, scales, tp):
    """float64, expert by expert."""
    x, W, A, B, router = (t.double() for t in (x, W, A, B, router))
    y = x @ W.t() + (0 if b is None else b.double())
    r0 = k0 = 0
    for p, (R_p, k_p, s_p) in enumerate(zip(ranks, experts, scales)):
        z = x @ router[k0 : k0 + k_p].t()
        z = z - z.max(dim=1, keepdim=True).values
        g = torch.where(z < -60, 0.0, z.exp())
        g = g / g.sum(dim=1, keepdim=True)
        on = torch.ones(x.shape[0], dtype=torch.float64) if tp is None else (tp == p).double()
        r = R_p // k_p
        for i in range(k_p):
            rows = slice(r0 + i * r, r0 + (i + 1) * r)
            y = y + (on * g[:, i] * s_p)[:, None] * ((x @ A[rows].t()) @ B[:, rows].t())
        r0, k0 = r0 + R_p, k0 + k_p
    return y


def _case(T, D, N, ranks, experts, dtype, seed, bias=True, routed=True, transposed=False):
    g = torch.Generator().manual_seed(seed)
    R, K = sum(ranks), sum(experts)
    x = torch.randn(T, D, generator=g)
    W = torch.randn(N, D, generator=g) / D**0.5
    if transposed:  # a Conv1D-style base: [d_in, d_out] storage read through a transposed view
        W = W.t().contiguous().t()
    b = torch.randn(N, generator=g) if bias else None
    A = torch.randn(R, D, generator=g) / D**0.5
    B = torch.randn(N, R, generator=g) / R**0.5
    router = torch.randn(K, D, generator=g) * 2 / D**0.5
    scales = tuple(float(s) for s in torch.rand(len(ranks), generator=g) * 2 + 0.5)
    tp = torch.randint(-1, len(ranks), (T,), generator=g, dtype=torch.int32) if routed else None
    ref = moe_reference(x, W, b, A, B, router, ranks, experts, scales, tp)
    args = [t if t is None else t.to(DEV, dtype) if t.is_floating_point() else t.to(DEV)
            for t in (x, W, b, A, B, router)]
    if transposed:
        args[1] = W.to(DEV, dtype).t().contiguous().t()
    return args, scales, (None if tp is None else tp.to(DEV)), ref


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    assert not y.isnan().any()
    err = (y.double().cpu() - ref).abs().max() / ref.abs().max()
    assert err <= TOL[dtype], float(err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 17, 64])
def test_two_plugins_routed_per_token(dtype, T):
    ranks, experts = (8, 24), (2, 4)
    (x, W, b, A, B, router), scales, tp, ref = _case(T, 37, 70, ranks, experts, dtype, seed=T)
    y = decode.decode_hlora_linear(x, W, b, A, B, router, ranks, experts, scales, tp)
    _check(y, ref, dtype)


@pytest.mark.parametrize("transposed", [False, True])
def test_one_plugin_without_routing_tensor(transposed):
    ranks, experts = (12,), (3,)
    (x, W, b, A, B, router), scales, _, ref = _case(3, 45, 129, ranks, experts, torch.float32, seed=7, bias=False,
                                                   routed=False, transposed=transposed)
    y = decode.decode_hlora_linear(x, W, None, A, B, router, ranks, experts, scales, None)
    _check(y, ref, torch.float32)


def test_back_to_back_launches_reuse_the_workspace():
    """The counters the last consumer resets are what the next launch (the next layer) starts from."""
    ranks, experts = (8, 24), (2, 4)
    for seed in range(3):
        (x, W, b, A, B, router), scales, tp, ref = _case(4, 33, 65, ranks, experts, torch.float32, seed=10 + seed)
        y = decode.decode_hlora_linear(x, W, b, A, B, router, ranks, experts, scales, tp)
        _check(y, ref, torch.float32)
    _, counters = next(iter(decode._workspaces.values()))
    assert counters.tolist() == [0, 0]


def test_limits():
    ranks, experts = (8,), (2,)
    (x, W, b, A, B, router), scales, _, _ = _case(65, 16, 16, ranks, experts, torch.float32, seed=0, routed=False)
    with pytest.raises(ValueError, match="at most 64 tokens"):
        decode.decode_hlora_linear(x, W, b, A, B, router, ranks, experts, scales, None)
    assert decode.decode_hlora_linear(x[:0], W, b, A, B, router, ranks, experts, scales, None).shape == (0, 16)
    assert not decode.supports(x[:8], W, (0.0,))  # gradients wanted: the launch has no backward
    with torch.no_grad():
        assert decode.supports(x[:64], W, (0.0,)) and not decode.supports(x, W, (0.0,))
        assert not decode.supports(x[:8], W, (0.1,)) and not decode.supports(x[:8], lambda t: t, (0.0,))


_COMPILE_SCRIPT = """
import torch
from hlora.kernels import compile_gate, decode, fused_linear
meta = dict(device="meta", dtype=torch.bfloat16)
launches = []
for ranks, experts in (((256,), (4,)), ((64, 256), (4, 4))):
    R, K = sum(ranks), sum(experts)
    tp = torch.empty(1, dtype=torch.int32, device="meta") if len(ranks) > 1 else None
    with fused_linear.record_launches() as rec:
        decode.decode_hlora_linear(torch.empty(1, 3072, **meta), torch.empty(9216, 3072, **meta), None,
                                   torch.empty(R, 3072, **meta), torch.empty(9216, R, **meta), torch.empty(K, 3072, **meta),
                                   ranks, experts, (2.0,) * len(ranks), tp)
    launches += rec
for launch, tile, arch, spec, roles in compile_gate.unique_compiles(launches, archs={90: "sm_90a"}).values():
    c = compile_gate.compile_one(launch, tile, arch, spec, roles)
    print(c.kernel, c.registers, c.spill_bytes, c.shared)
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the tests above run the compiled kernel")
def test_compiles_for_hopper_without_spills():
    """Compiled ahead of time for sm_90a as launched for a decode step of M3's qkv projection (one
    plugin, and both stacked with a routing tensor): the interpreter does not check that the kernel
    compiles (it once did not: a name reused across the two program kinds)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("_decode_kernel")]
    assert len(rows) == 2
    for _, registers, spills, shared in rows:
        assert int(spills) == 0 and 0 < int(registers) <= 255 and int(shared) <= 232448


def test_custom_op_traces_whole_and_matches_the_reference():
    """``decode.decode_linear`` (what a step compiled by ``torch.compile`` calls): the op's schema and fake
    implementation hold (``opcheck``), a traced call is one graph (fullgraph) holding the op, and its
    output is the float64 reference's at T = 1 and an odd T, two plugins, -1 tokens included."""
    ranks, experts = (8, 24), (2, 4)
    for T, seed in ((1, 20), (7, 23)):
        (x, W, b, A, B, router), scales, tp, ref = _case(T, 37, 70, ranks, experts, torch.float32, seed=seed)
        if T == 7:
            assert set(tp.tolist()) == {-1, 0, 1}
        args = (x, W, b, A, B, router, list(ranks), list(experts), list(scales), tp)
        torch.library.opcheck(decode.decode_linear, args, test_utils=("test_schema", "test_faketensor"))
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        traced = torch.compile(lambda *a: decode.decode_linear(*a) * 1.0, fullgraph=True, backend=backend)
        with torch.no_grad():
            y = traced(*args)
        assert len(graphs) == 1
        assert any(n.target is torch.ops.hlora.decode_linear.default for n in graphs[0].graph.nodes)
        _check(y, ref, torch.float32)
