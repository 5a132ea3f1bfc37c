"""Fused Triton H-LoRA kernels (``hlora.kernels``) against an independent float64 reference.

On a CPU the kernels run in the Triton interpreter: ``TRITON_INTERPRET=1`` is set here, before
the first kernel call defines them (``hlora.kernels`` imports its Triton module lazily; if another
test already imported it without the interpreter it is reloaded). On a GPU the same tests run
compiled kernels. Every call goes through ``hlora.functional.hlora_linear`` with
``HLORA_BACKEND=triton`` unless it tests a launcher, and ``HLORA_KERNELS_POISON=1`` makes every
kernel output start as NaN, so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
    _loaded = sys.modules.get("hlora.kernels.fused_linear")
    if _loaded is not None and not _loaded.INTERPRET:
        importlib.reload(_loaded)

from hlora.functional import hlora_linear, hlora_mixture  # noqa: E402
from hlora.routing import TokenGroups  # noqa: E402

fused_linear = importlib.import_module("hlora.kernels.fused_linear")

pytestmark = pytest.mark.triton

DEV = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |error| allowed, relative to the largest |value| of the float64 reference tensor
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("HLORA_BACKEND", "triton")
    monkeypatch.setenv("HLORA_KERNELS_POISON", "1")


# ----------------------------------------------------------------------------------------------
# independent float64 reference (not the repo's torch path)
# ----------------------------------------------------------------------------------------------


def reference(x, W, b, A, B, router, ranks, experts, scales, tp, keep=None, dropouts=None):
    """y for x [T, D] in float64; ``keep`` [T, R] is a dropout keep mask (1/0) with ``dropouts``."""
    T = x.shape[0]
    y = x @ W.t()
    if b is not None:
        y = y + b
    r0 = k0 = 0
    for q, (R_q, k_q, s_q) in enumerate(zip(ranks, experts, scales)):
        logits = x @ router[k0 : k0 + k_q].t()
        z = logits - logits.max(dim=1, keepdim=True).values.detach()
        z = torch.where(z < -60, torch.full_like(z, float("-inf")), z)
        g = torch.softmax(z, dim=1)
        routed = (tp == q) if tp is not None else torch.full((T,), q == 0, device=x.device)
        g = g * routed[:, None].to(g.dtype)
        u = s_q * (x @ A[r0 : r0 + R_q].t())
        if keep is not None:
            u = u * keep[:, r0 : r0 + R_q] / (1.0 - dropouts[q])
        h = (u.view(T, k_q, R_q // k_q) * g[:, :, None]).reshape(T, R_q)
        y = y + h @ B[:, r0 : r0 + R_q].t()
        r0, k0 = r0 + R_q, k0 + k_q
    return y


def make_case(T, D, N, ranks, experts, dtype, param_dtype=torch.float32, bias=True, conv1d=False, seed=0):
    """Random non-zero inputs; every value is representable in ``dtype`` (the kernels round the
    float32 adapter weights to x's dtype tile by tile, as the reference path does)."""
    g = torch.Generator().manual_seed(seed)
    R, K = sum(ranks), sum(experts)

    def rnd(*shape, scale=1.0, dt=dtype):
        v = (torch.randn(*shape, generator=g) * scale).to(dtype)
        return v.to(dt).to(DEV)

    case = dict(
        x=rnd(T, D),
        W=rnd(D, N, scale=D**-0.5).t() if conv1d else rnd(N, D, scale=D**-0.5),  # Conv1D: a transposed view
        b=rnd(N) if bias else None,
        A=rnd(R, D, scale=D**-0.5, dt=param_dtype),
        B=rnd(N, R, scale=R**-0.5, dt=param_dtype),
        router=rnd(K, D, scale=2 * D**-0.5, dt=param_dtype),
    )
    return case


def run(case, ranks, experts, scales, tp=None, dropout=0.0, training=False, lead=None):
    """Kernel forward + backward of sum(y * w): (y, w, {name: grad})."""
    x = case["x"].clone().requires_grad_()
    params = {k: case[k].clone().requires_grad_() for k in ("A", "B", "router")}
    xin = x.view(*lead, x.shape[-1]) if lead else x
    y = hlora_linear(xin, case["W"], case["b"], params["A"], params["B"], params["router"],
                     ranks, experts, scales, tp, dropout, training)
    y = y.reshape(-1, y.shape[-1])
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV, y.dtype)
    (y.float() * w.float()).sum().backward()
    grads = {"x": x.grad, **{k: p.grad for k, p in params.items()}}
    return y.detach(), w, grads


def reference_run(case, w, ranks, experts, scales, tp=None, keep=None, dropouts=None):
    c = {k: (v.detach().double() if v is not None else None) for k, v in case.items()}
    leaves = {k: c[k].clone().requires_grad_() for k in ("x", "A", "B", "router")}
    y = reference(leaves["x"], c["W"], c["b"], leaves["A"], leaves["B"], leaves["router"],
                  ranks, experts, scales, tp, keep, dropouts)
    (y * w.double()).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def assert_near(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def module_base(case, trainable: bool):
    """``case`` with its base as an ``nn.Linear`` holding W and b (the layer runs the module's own
    forward and autograd and adds the adapter into its output) -> (module, the case to run)."""
    module = torch.nn.Linear(case["W"].shape[1], case["W"].shape[0]).to(DEV, case["W"].dtype).requires_grad_(trainable)
    with torch.no_grad():
        module.weight.copy_(case["W"])
        module.bias.copy_(case["b"])
    return module, {**case, "W": module, "b": None}


def assert_matches_reference(y, w, grads, case, ranks, experts, scales, tp, dtype):
    """y and the gradients of x, A, B, router (in their own dtypes) against the float64 reference."""
    y_ref, g_ref = reference_run(case, w, ranks, experts, scales, tp)
    assert y.dtype == dtype
    assert_near(y, y_ref, TOL[dtype], "y")
    for k in ("x", "A", "B", "router"):
        assert grads[k].dtype == case[k].dtype, k
        assert_near(grads[k], g_ref[k], 2 * TOL[dtype], f"d{k}")


def assert_idle_plugins_get_no_gradient(grads, ranks, experts, routing):
    """A plugin no token is routed to gets exactly zero A and router gradients."""
    for q in set(range(len(ranks))) - set(routing):
        r0, k0 = sum(ranks[:q]), sum(experts[:q])
        assert not grads["A"][r0 : r0 + ranks[q]].any() and not grads["router"][k0 : k0 + experts[q]].any()


# ----------------------------------------------------------------------------------------------
# forward and gradients
# ----------------------------------------------------------------------------------------------

CASES = {
    # name: (T, D, N, ranks, experts, scales, routing, extra)
    "one-token": (1, 19, 23, (8,), (2,), (2.0,), None, {}),
    "two-plugins-mixed": (7, 19, 23, (8, 12), (2, 3), (2.0, 0.5), [0, 1, -1, 1, 0, -1, 1], {}),
    "conv1d-batched-nobias": (6, 19, 23, (6,), (2,), (1.5,), None, dict(conv1d=True, bias=False, lead=(2, 3))),
    "tiles-and-odd-ranks": (40, 37, 33, (12, 4), (3, 4), (1.0, 3.0), "random", dict(param_dtype=None)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_float64(name, dtype):
    T, D, N, ranks, experts, scales, routing, extra = CASES[name]
    extra = dict(extra)
    lead = extra.pop("lead", None)
    if extra.get("param_dtype", 0) is None:
        extra["param_dtype"] = dtype  # adapter weights in x's dtype too
    case = make_case(T, D, N, ranks, experts, dtype, **extra)
    if routing == "random":
        tp = torch.randint(-1, len(ranks), (T,), generator=torch.Generator().manual_seed(2)).to(DEV)
    elif routing is not None:
        tp = torch.tensor(routing, device=DEV)
    else:
        tp = None
    y, w, grads = run(case, ranks, experts, scales, tp, lead=lead)
    y_ref, g_ref = reference_run(case, w, ranks, experts, scales, tp)

    assert y.dtype == dtype and y.shape == (T, N)
    tol = TOL[dtype]
    assert_near(y, y_ref, tol, "y")
    for k in ("x", "A", "B", "router"):
        assert grads[k].dtype == case[k].dtype, k
        assert_near(grads[k], g_ref[k], 2 * tol, f"d{k}")
    # the adapter really contributes (B is non-zero), so the comparison above is not vacuous
    base = case["x"].double() @ case["W"].double().t()
    assert (y_ref - base).abs().max() > 0.05 * y_ref.abs().max()

    if tp is not None and bool((tp == -1).any()):
        # tokens routed to no plugin get exactly the base output of the same kernels
        with torch.no_grad():
            y_base = hlora_linear(case["x"], case["W"], case["b"], case["A"], case["B"], case["router"],
                                  ranks, experts, scales, torch.full_like(tp, -1))
        assert torch.equal(y[tp == -1], y_base[tp == -1])


@pytest.mark.parametrize("how,dtype", [("fused", torch.float32), ("cublas", torch.float32),
                                       ("cublas", torch.bfloat16), ("module", torch.float32)],
                         ids=["fused", "cublas", "cublas-bf16", "module"])
def test_strategies_and_a_module_base_match_float64(how, dtype, monkeypatch):
    """Both strategies for the base product, and a base given as a module (its own forward and
    autograd, the adapter added into its output), on mixed routing with 70 tokens (enough for the
    weight gradients' atomic split under the interpreter)."""
    monkeypatch.setenv("HLORA_STRATEGY", "fused" if how == "module" else how)
    ranks, experts, scales = (12, 4), (3, 4), (1.0, 3.0)
    case = make_case(70, 21, 19, ranks, experts, dtype)
    tp = torch.randint(-1, 2, (70,), generator=torch.Generator().manual_seed(5)).to(DEV)
    y, w, grads = run(module_base(case, trainable=False)[1] if how == "module" else case, ranks, experts, scales, tp)
    assert_matches_reference(y, w, grads, case, ranks, experts, scales, tp, dtype)


def test_unknown_strategy_is_refused(monkeypatch):
    monkeypatch.setenv("HLORA_STRATEGY", "fastest")
    case = make_case(3, 19, 23, (8,), (2,), torch.float32)
    with pytest.raises(ValueError, match="HLORA_STRATEGY"):
        hlora_linear(case["x"], case["W"], case["b"], case["A"], case["B"], case["router"], (8,), (2,), (2.0,))


def test_unrouted_tokens_are_the_base_layer_exactly():
    dtype = torch.float32
    ranks, experts, scales = (8, 12), (2, 3), (2.0, 0.5)
    case = make_case(5, 19, 23, ranks, experts, dtype)
    tp = torch.full((5,), -1, device=DEV)
    y, w, grads = run(case, ranks, experts, scales, tp)
    zero_adapter = {**case, "B": torch.zeros_like(case["B"])}
    y0, _, _ = run(zero_adapter, ranks, experts, scales, torch.zeros(5, dtype=torch.int64, device=DEV))
    assert torch.equal(y, y0)
    for k in ("A", "B", "router"):
        assert torch.equal(grads[k], torch.zeros_like(grads[k])), k
    y_ref, g_ref = reference_run(case, w, ranks, experts, scales, tp)
    assert_near(y, y_ref, TOL[dtype], "y")
    assert_near(grads["x"], g_ref["x"], TOL[dtype], "dx")


def test_stacked_plugins_without_a_routing_tensor_are_refused():
    ranks, experts, scales = (8, 12), (2, 3), (2.0, 0.5)
    case = make_case(6, 19, 23, ranks, experts, torch.float32)
    args = (case["x"], case["W"], case["b"], case["A"], case["B"], case["router"], ranks, experts, scales)
    with pytest.raises(ValueError, match="token_plugin is None"):
        hlora_linear(*args, None)


def test_summed_output_gradient_with_stride_zero():
    """y.sum() hands the backward an expanded (stride 0) dy."""
    ranks, experts, scales = (12,), (3,), (2.0,)
    case = make_case(7, 19, 23, ranks, experts, torch.float32)
    x = case["x"].clone().requires_grad_()
    A = case["A"].clone().requires_grad_()
    y = hlora_linear(x, case["W"], case["b"], A, case["B"], case["router"], ranks, experts, scales)
    y.sum().backward()
    ones = torch.ones(7, 23, dtype=torch.float64, device=DEV)
    _, g_ref = reference_run(case, ones, ranks, experts, scales)
    assert_near(x.grad, g_ref["x"], 4e-5, "dx")
    assert_near(A.grad, g_ref["A"], 4e-5, "dA")


def test_peaked_router_flushes_tiny_gates():
    """A logit 70 below the row max gets exactly zero weight: its gate exp(-70) ~ 4e-31 would still be
    a normal float32, so only the flush makes the router gradient of this one token exactly zero."""
    ranks, experts, scales = (8,), (2,), (1.0,)
    case = make_case(1, 19, 23, ranks, experts, torch.float32)
    x0 = case["x"][0]
    case["router"][1] = case["router"][0] - 70 * x0 / x0.norm() ** 2
    y, w, grads = run(case, ranks, experts, scales)
    y_ref, g_ref = reference_run(case, w, ranks, experts, scales)
    assert_near(y, y_ref, 1e-5, "y")
    assert torch.equal(grads["router"], torch.zeros_like(grads["router"]))
    assert torch.equal(g_ref["router"], torch.zeros_like(g_ref["router"]))


def test_gemm_options_and_transposed_operands():
    """The one GEMM kernel: three K pairs, bias, an added input matrix, transposed views, B rows
    from two tensors, output rows to two tensors, and the atomic split of a long K axis."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEV)

    a1, b1 = rnd(45, 21), rnd(21, 33).t()  # b1 [33, 21], column-major
    a2, b2 = rnd(9, 45).t(), rnd(33, 9)  # a2 [45, 9], column-major
    a3, b3 = rnd(45, 5), rnd(33, 5)
    bias, cin = rnd(33), rnd(45, 33)
    c = torch.full((45, 33), float("nan"), device=DEV)
    fused_linear.gemm("test", c, a1, b1, a2=a2, b2=b2, a3=a3, b3=b3, bias=bias, cin=cin, tokens=45,
                      dot_dtype=torch.float32)
    d = {k: v.double() for k, v in dict(a1=a1, b1=b1, a2=a2, b2=b2, a3=a3, b3=b3, bias=bias, cin=cin).items()}
    expected = d["a1"] @ d["b1"].t() + d["a2"] @ d["b2"].t() + d["a3"] @ d["b3"].t() + d["bias"] + d["cin"]
    assert_near(c, expected, 1e-5, "three pairs + bias + cin")
    # B rows from two tensors (x @ [A; router]^T without concatenating)
    A, router = rnd(20, 21), rnd(7, 21)
    c = torch.full((45, 27), float("nan"), device=DEV)
    fused_linear.gemm("test", c, a1, A, b1x=router, n_split=20, tokens=45, dot_dtype=torch.float32)
    assert_near(c, d["a1"] @ torch.cat([A, router]).double().t(), 1e-5, "two B pointers")
    # weight-gradient form: the long token axis is K, split over programs (3 under the interpreter,
    # multiples of 256 tokens on a GPU) that add atomically into two outputs split by rows
    dy, x = rnd(600, 27), rnd(600, 21)
    top, bottom = torch.zeros(20, 21, device=DEV), torch.zeros(7, 21, device=DEV)
    fused_linear.gemm("test", top, dy.t(), x.t(), out2=bottom, atomic=True, tokens=600, dot_dtype=torch.float32)
    expected = dy.double().t() @ x.double()
    assert_near(top, expected[:20], 1e-5, "atomic split, rows < 20")
    assert_near(bottom, expected[20:], 1e-5, "atomic split, rows >= 20")


def test_dh_and_db_in_one_pass():
    g = torch.Generator().manual_seed(4)
    dy = torch.randn(37, 29, generator=g).to(DEV)
    B = torch.randn(29, 20, generator=g).to(DEV)
    h = torch.randn(37, 32, generator=g).to(DEV)  # rows padded to 32, 20 used
    dh = torch.full((37, 32), float("nan"), device=DEV)
    db = torch.zeros(29, 20, device=DEV)
    fused_linear.dh_db(dy, B, h, dh, db, dot_dtype=torch.float32)
    assert_near(dh[:, :20], dy.double() @ B.double(), 1e-5, "dh")
    assert_near(db, dy.double().t() @ h[:, :20].double(), 1e-5, "dB")
    assert torch.isnan(dh[:, 20:]).all()  # the padding is never written (nor read)


def test_poisoned_allocation_is_active():
    t = fused_linear._empty((3, 2), torch.float32, torch.device(DEV))
    assert torch.isnan(t).all()


# ----------------------------------------------------------------------------------------------
# dropout: Philox mask from one seed drawn from torch's default generator
# ----------------------------------------------------------------------------------------------


def _probe_mask(ranks, experts, scales, dropouts, T=48, seed=0):
    """Recover the rank-space dropout mask of the call made after ``torch.manual_seed(seed)``:
    with W0 = 0 and B = [I; 0] the output is h itself."""
    R, D = sum(ranks), 19
    case = make_case(T, D, R + 3, ranks, experts, torch.float32, bias=False)
    case["W"] = torch.zeros_like(case["W"])
    case["B"] = torch.eye(R + 3, R, device=DEV)
    tp = torch.arange(T, device=DEV) % len(ranks)
    args = (case["x"], case["W"], None, case["A"], case["B"], case["router"], ranks, experts, scales, tp)
    with torch.no_grad():
        h_full = hlora_linear(*args, 0.0, True)
        torch.manual_seed(seed)
        h_drop = hlora_linear(*args, dropouts, True)
    assert torch.equal(h_drop[:, R:], torch.zeros(T, 3, device=DEV))
    h_full, h_drop = h_full[:, :R], h_drop[:, :R]
    live = h_full != 0
    p = torch.tensor([dropouts[q] for q, R_q in enumerate(ranks) for _ in range(R_q)], device=DEV)
    keep = (h_drop != 0) | ~live
    # every live value is either dropped or scaled by exactly 1 / (1 - p)
    torch.testing.assert_close(torch.where(keep, h_drop, 0.0), torch.where(keep, h_full / (1 - p), 0.0))
    return keep.to(torch.float64), live, tp


def test_dropout_mask_is_seeded_and_unbiased():
    ranks, experts, scales = (8, 12), (2, 3), (2.0, 0.5)
    keep, live, _ = _probe_mask(ranks, experts, scales, (0.25, 0.25), T=64)
    frac = keep[live].mean().item()
    assert abs(frac - 0.75) < 0.06, frac
    assert not torch.equal(keep[0], keep[2]) and not torch.equal(keep[:, 0], keep[:, 1])
    keep_again, _, _ = _probe_mask(ranks, experts, scales, (0.25, 0.25), T=64)
    assert torch.equal(keep, keep_again)
    keep_other, _, _ = _probe_mask(ranks, experts, scales, (0.25, 0.25), T=64, seed=1)
    assert not torch.equal(keep, keep_other)
    # one probability per plugin
    keep2, live2, _ = _probe_mask(ranks, experts, scales, (0.0, 0.5), T=64)
    assert keep2[:, :8].all()
    assert abs(keep2[:, 8:][live2[:, 8:]].mean().item() - 0.5) < 0.1


def test_dropout_output_reproducible_and_mean_preserving():
    ranks, experts, scales = (8,), (2,), (2.0,)
    case = make_case(7, 19, 23, ranks, experts, torch.float16)
    args = (case["x"], case["W"], case["b"], case["A"], case["B"], case["router"], ranks, experts, scales, None)
    with torch.no_grad():
        torch.manual_seed(5)
        y1 = hlora_linear(*args, 0.3, True)
        torch.manual_seed(5)
        y2 = hlora_linear(*args, 0.3, True)
        y_eval = hlora_linear(*args, 0.3, False)
        assert torch.equal(y1, y2)
        assert not torch.equal(y1, y_eval)
        mean = sum(hlora_linear(*args, 0.3, True).double() for _ in range(24)) / 24
    base = case["x"].double() @ case["W"].double().t() + case["b"].double()
    delta, delta_mean = y_eval.double() - base, mean - base
    assert (delta_mean - delta).norm() < 0.35 * delta.norm()


def test_dropout_gradients_use_the_forward_mask():
    ranks, experts, scales, dropouts = (8, 12), (2, 3), (2.0, 0.5), (0.25, 0.25)
    keep, _, tp = _probe_mask(ranks, experts, scales, dropouts, T=16, seed=7)
    # same seed, same mask (it depends only on seed, token and column), now with a real W0 and B
    case = make_case(16, 19, sum(ranks) + 3, ranks, experts, torch.float32, bias=False)
    assert_dropout_run_matches_mask(case, ranks, experts, scales, dropouts, tp, keep, seed=7)


def assert_dropout_run_matches_mask(case, ranks, experts, scales, dropouts, tp, keep, seed):
    """A training call with dropout (seeded as ``_probe_mask`` was) equals float64 with the mask ``keep``."""
    torch.manual_seed(seed)
    y, w, grads = run(case, ranks, experts, scales, tp, dropout=dropouts, training=True)
    y_ref, g_ref = reference_run(case, w, ranks, experts, scales, tp, keep=keep, dropouts=dropouts)
    assert_near(y, y_ref, 1e-5, "y")
    for k in ("x", "A", "B", "router"):
        assert_near(grads[k], g_ref[k], 4e-5, f"d{k}")


def test_dropout_survives_checkpoint_recompute():
    from torch.utils.checkpoint import checkpoint

    ranks, experts, scales = (8,), (2,), (2.0,)
    case = make_case(6, 19, 23, ranks, experts, torch.float32)

    def grads(use_checkpoint):
        x = case["x"].clone().requires_grad_()
        A = case["A"].clone().requires_grad_()

        def f(x, A):
            return hlora_linear(x, case["W"], case["b"], A, case["B"], case["router"], ranks, experts, scales,
                                None, 0.5, True)

        torch.manual_seed(11)
        y = checkpoint(f, x, A, use_reentrant=False) if use_checkpoint else f(x, A)
        (y * y).sum().backward()
        return y.detach(), x.grad, A.grad

    for a, b in zip(grads(False), grads(True)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# contract edges
# ----------------------------------------------------------------------------------------------


def test_trainable_base_falls_back_to_the_reference_path():
    ranks, experts, scales = (8,), (2,), (2.0,)
    case = make_case(5, 19, 23, ranks, experts, torch.float32)
    W = case["W"].clone().requires_grad_()
    with pytest.warns(UserWarning, match="frozen"):
        import hlora.functional

        hlora.functional._warned_frozen = False
        y = hlora_linear(case["x"], W, case["b"], case["A"], case["B"], case["router"], ranks, experts, scales)
    y.sum().backward()
    assert W.grad is not None
    y_ref = reference(*(case[k].double() for k in ("x", "W", "b", "A", "B", "router")), ranks, experts, scales, None)
    assert_near(y.detach(), y_ref, 1e-5, "y")


def test_bad_dropout_list_is_rejected():
    case = make_case(2, 19, 23, (8,), (2,), torch.float32)
    args = (case["x"], case["W"], case["b"], case["A"], case["B"], case["router"], (8,), (2,), (2.0,), None)
    with pytest.raises(ValueError, match="dropout"):
        hlora_linear(*args, (0.1, 0.2), True)
    with pytest.raises(ValueError, match="dropout"):
        hlora_linear(*args, 1.0, True)


def test_partial_gradients():
    """Frozen adapter (only dx) and a leaf input without grad (only the adapter's grads)."""
    ranks, experts, scales = (8, 12), (2, 3), (2.0, 0.5)
    case = make_case(7, 19, 23, ranks, experts, torch.float32)
    tp = torch.tensor([0, 1, -1, 1, 0, -1, 1], device=DEV)
    w = torch.randn(7, 23, generator=torch.Generator().manual_seed(1)).to(DEV)
    _, g_ref = reference_run(case, w, ranks, experts, scales, tp)
    x = case["x"].clone().requires_grad_()
    y = hlora_linear(x, case["W"], case["b"], case["A"], case["B"], case["router"], ranks, experts, scales, tp)
    (y * w).sum().backward()
    assert_near(x.grad, g_ref["x"], 2e-5, "dx")
    B = case["B"].clone().requires_grad_()
    y = hlora_linear(case["x"], case["W"], case["b"], case["A"], B, case["router"], ranks, experts, scales, tp)
    (y * w).sum().backward()
    assert_near(B.grad, g_ref["B"], 2e-5, "dB")


def test_autocast_computes_in_the_autocast_dtype():
    ranks, experts, scales = (8,), (2,), (2.0,)
    case = make_case(5, 19, 23, ranks, experts, torch.bfloat16)
    case = {k: (v.float() if v is not None else None) for k, v in case.items()}
    with torch.autocast(DEV, dtype=torch.bfloat16):
        y = hlora_linear(case["x"], case["W"], case["b"], case["A"], case["B"], case["router"], ranks, experts, scales)
    assert y.dtype == torch.bfloat16
    y_ref = reference(*(case[k].double() for k in ("x", "W", "b", "A", "B", "router")), ranks, experts, scales, None)
    assert_near(y, y_ref, TOL[torch.bfloat16], "y")


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the real ops."""
    ranks, experts, scales = [8, 12], [2, 3], [2.0, 0.5]
    case = make_case(7, 19, 23, ranks, experts, torch.float32)
    tp = torch.tensor([0, 1, -1, 1, 0, -1, 1], device=DEV, dtype=torch.int32)
    A, B, router = (case[k].clone().requires_grad_() for k in ("A", "B", "router"))
    x = case["x"].clone().requires_grad_()
    fwd_args = (x, case["W"], case["b"], None, A, B, router, tp, ranks, experts, scales, [0.1, 0.1], 123)
    torch.library.opcheck(torch.ops.hlora.fused_fwd.default, fwd_args)
    with torch.no_grad():
        _, ul, h = torch.ops.hlora.fused_fwd(*fwd_args)
    # rank-space activations: rows padded to a multiple of 16 elements (R + K = 25, R = 20)
    assert ul.shape == (7, 25) and h.shape == (7, 20) and ul.stride() == (32, 1) and h.stride() == (32, 1)
    dy = torch.randn(7, 23, device=DEV)
    bwd_args = (dy, x.detach(), case["W"], A.detach(), B.detach(), router.detach(), tp, ul, h, ranks, experts, scales,
                [0.1, 0.1], 123, True, True)
    torch.library.opcheck(torch.ops.hlora.fused_bwd.default, bwd_args)


def test_torch_compile_sees_one_op():
    """fullgraph capture (the custom ops are opaque to the compiler) with gradients equal to eager."""
    ranks, experts, scales = (8, 12), (2, 3), (2.0, 0.5)
    case = make_case(7, 19, 23, ranks, experts, torch.float32)
    tp = torch.tensor([0, 1, -1, 1, 0, -1, 1], device=DEV)

    def f(x, A, B, router):
        return torch.relu(hlora_linear(x, case["W"], case["b"], A, B, router, ranks, experts, scales, tp))

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        leaves = [case[k].clone().requires_grad_() for k in ("x", "A", "B", "router")]
        y = fn(*leaves)
        y.sum().backward()
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# grouped plugins: hlora_mixture with per-plugin tensors and the tokens grouped by plugin
# ----------------------------------------------------------------------------------------------


def _plugin_slices(t, sizes, dim=0):
    """Each plugin's own leaf tensor (a copy of its slice of the stacked case tensor)."""
    return [part.clone().requires_grad_() for part in t.split(list(sizes), dim)]


def run_grouped(case, ranks, experts, scales, tp, dropout=0.0, training=False):
    """``run`` through ``hlora_mixture``: each plugin's A / B / router a separate leaf, the tokens
    grouped by ``TokenGroups``; the plugins' gradients are returned stacked, as ``run``'s."""
    x = case["x"].clone().requires_grad_()
    As, Bs, routers = (_plugin_slices(case["A"], ranks), _plugin_slices(case["B"], ranks, 1),
                       _plugin_slices(case["router"], experts))
    groups = TokenGroups.from_token_plugin(tp, len(ranks))
    y = hlora_mixture(x, case["W"], case["b"], As, Bs, routers, ranks, experts, scales, tp, groups, dropout, training)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV, y.dtype)
    (y.float() * w.float()).sum().backward()
    grads = {"x": x.grad, "A": torch.cat([a.grad for a in As]), "B": torch.cat([b.grad for b in Bs], 1),
             "router": torch.cat([r.grad for r in routers])}
    return y.detach(), w, grads


GROUPED_CASES = {
    # name: (T, D, N, ranks, experts, scales, routing, adapter weights in x's dtype (else float32))
    "mixed-with-unrouted": (37, 19, 23, (8, 12), (2, 3), (2.0, 0.5), "random", False),
    "plugin-without-tokens": (11, 21, 17, (4, 12, 6), (1, 3, 2), (1.0, 0.5, 3.0), [2, 0, -1, 2, 2, 0, -1, 0, 2, 2, 0],
                              True),
    "one-token": (1, 19, 23, (8, 12), (2, 3), (2.0, 0.5), [1], False),
    "all-unrouted": (5, 19, 23, (8, 12), (2, 3), (2.0, 0.5), [-1] * 5, True),
}


def _routing(T, P, routing, seed=2):
    if routing == "random":
        return torch.randint(-1, P, (T,), generator=torch.Generator().manual_seed(seed)).to(DEV)
    return torch.tensor(routing, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(GROUPED_CASES))
def test_grouped_plugins_match_float64(name, dtype):
    T, D, N, ranks, experts, scales, routing, same_dtype = GROUPED_CASES[name]
    case = make_case(T, D, N, ranks, experts, dtype, param_dtype=dtype if same_dtype else torch.float32)
    tp = _routing(T, len(ranks), routing)
    y, w, grads = run_grouped(case, ranks, experts, scales, tp)
    assert_matches_reference(y, w, grads, case, ranks, experts, scales, tp, dtype)
    if routing != "random":  # a plugin without tokens gets exactly zero gradients
        assert_idle_plugins_get_no_gradient(grads, ranks, experts, routing)


@pytest.mark.parametrize("how", ["cublas", "module"])
def test_grouped_strategies_and_a_module_base_match_float64(how, monkeypatch):
    """The cuBLAS-base strategy and a base module on grouped plugins, 70 tokens (the weight
    gradients' atomic split over each segment's tokens)."""
    monkeypatch.setenv("HLORA_STRATEGY", "cublas" if how == "cublas" else "fused")
    ranks, experts, scales = (12, 4), (3, 4), (1.0, 3.0)
    case = make_case(70, 21, 19, ranks, experts, torch.float32)
    tp = _routing(70, 2, "random", seed=5)
    if how == "module":
        base = torch.nn.Linear(21, 19).to(DEV).requires_grad_(False)
        with torch.no_grad():
            base.weight.copy_(case["W"])
            base.bias.copy_(case["b"])
        y, w, grads = run_grouped({**case, "W": base, "b": None}, ranks, experts, scales, tp)
    else:
        y, w, grads = run_grouped(case, ranks, experts, scales, tp)
    y_ref, g_ref = reference_run(case, w, ranks, experts, scales, tp)
    assert_near(y, y_ref, TOL[torch.float32], "y")
    for k in ("x", "A", "B", "router"):
        assert_near(grads[k], g_ref[k], 2 * TOL[torch.float32], f"d{k}")


def test_grouped_dropout_gradients_use_the_forward_mask():
    """Dropout on grouped plugins: the backward uses the forward's mask (the gradients of an
    adapter whose B is probed by a one-hot dy equal the float64 reference with the mask read from
    the forward), and two plugins' segments do not share one mask."""
    ranks, experts, scales, dropouts = (8, 8), (2, 2), (2.0, 0.5), (0.5, 0.5)
    T, D, N = 12, 19, 23
    case = make_case(T, D, N, ranks, experts, torch.float32)
    tp = torch.tensor([0, 1] * 6, device=DEV)
    groups = TokenGroups.from_token_plugin(tp, 2)
    # the forward's h, read through an identity B (N = R): h = (y - base) / 1 on each plugin's columns
    eye = torch.eye(16, device=DEV)
    probe = {**case, "B": eye, "W": torch.zeros(16, D, device=DEV), "b": None}
    As, routers = _plugin_slices(case["A"], ranks), _plugin_slices(case["router"], experts)
    torch.manual_seed(11)
    h_drop = hlora_mixture(case["x"], probe["W"], None, As, list(eye.split([8, 8], 1)), routers, ranks, experts,
                           scales, tp, groups, dropouts, True).detach()
    h_full = hlora_mixture(case["x"], probe["W"], None, As, list(eye.split([8, 8], 1)), routers, ranks, experts,
                           scales, tp, groups, 0.0, False).detach()
    live = h_full != 0
    keep = ((h_drop != 0) | ~live).double()
    torch.testing.assert_close(torch.where(keep.bool(), h_drop, 0.0), torch.where(keep.bool(), 2 * h_full, 0.0))
    assert 0.2 < keep[live].mean().item() < 0.8
    # row i of plugin 0's segment and row i of plugin 1's: different masks
    assert not torch.equal(keep[0::2, :8], keep[1::2, 8:])
    torch.manual_seed(11)
    y, w, grads = run_grouped(case, ranks, experts, scales, tp, dropout=dropouts, training=True)
    y_ref, g_ref = reference_run(case, w, ranks, experts, scales, tp, keep=keep, dropouts=dropouts)
    assert_near(y, y_ref, 1e-5, "y")
    for k in ("x", "A", "B", "router"):
        assert_near(grads[k], g_ref[k], 2e-5, f"d{k}")


@pytest.mark.parametrize("gate", ["epilogue", "kernels"])
def test_grouped_launches_do_each_plugins_rank_work_on_its_own_tokens(gate, monkeypatch):
    """The launch plan of a mixed batch: per plugin, the rank-space GEMMs and gates cover its own
    tokens and ranks only, read its own tensors (nothing concatenated), and the unrouted tokens do
    no rank work (only the base product). Every plugin here fits the gate epilogues; ``kernels``
    narrows the epilogue's limit so that all of them take the gate kernels instead."""
    if gate == "kernels":
        monkeypatch.setattr(fused_linear, "EPILOGUE_MAX_EXPERTS", 0)
    ranks, experts, counts, T, D, N = (8, 12, 4), (2, 3, 4), (5, 0, 3), 10, 19, 23
    meta = dict(device="meta")
    x, W, dy = torch.empty(T, D, **meta), torch.empty(N, D, **meta), torch.empty(T, N, **meta)
    As = [torch.empty(r, D, **meta) for r in ranks]
    Bs = [torch.empty(N, r, **meta) for r in ranks]
    routers = [torch.empty(k, D, **meta) for k in experts]
    order = torch.empty(T, dtype=torch.int32, **meta)
    args = (ranks, experts, (1.0,) * 3, (0.0,) * 3, 7)
    with fused_linear.record_launches() as launches:
        _, ul, h = fused_linear.grouped_forward(x, W, None, None, As, Bs, routers, order, counts, *args)
        fused_linear.grouped_backward(dy, x, W, As, Bs, routers, order, counts, ul, h, *args)
    by_role = {}
    for launch in launches:
        by_role.setdefault(launch.role, []).append(launch)
    ul, dh_db = ("ul_gate", "dh_db_gate") if gate == "epilogue" else ("ul", "dh_db")
    assert [(l.args["M"], l.args["N"]) for l in by_role[ul]] == [(5, 10), (3, 8)]
    assert [l.args["b1_ptr"] for l in by_role[ul]] == [As[0], As[2]]
    assert [l.args["b1x_ptr"] for l in by_role[ul]] == [routers[0], routers[2]]
    if gate == "epilogue":  # each plugin's gate in its own launches: its table row, its h / dUL rows
        assert "gate_fwd" not in by_role and "gate_bwd" not in by_role
        assert [l.args["GATE_Q"] for l in by_role[ul] + by_role[dh_db]] == [0, 2, 0, 2]
        assert [l.args["h_ptr"].shape[0] for l in by_role[ul]] == [5, 3]
        assert [(l.args["dh_ptr"].shape[0], l.args["ul_ptr"].shape[0]) for l in by_role[dh_db]] == [(5, 5), (3, 3)]
    else:  # one gate launch over the segments (8 routed rows): the largest one's row blocks x the 2
        for role, r_width in (("gate_fwd", 12), ("gate_bwd", 12)):  # plugins with tokens
            (launch,) = by_role[role]
            assert (launch.args["T"], launch.args["R"], launch.grid({"BLOCK_T": 2})) == (8, r_width, (3, 2))
    # y and dx: the unrouted tokens' base product, then each plugin's tokens with its rank columns
    for role, k_of in (("y_fused", "K2"), ("dx_fused", "K3")):
        assert [(l.args["M"], l.args[k_of]) for l in by_role[role]] == [(2, 0), (5, {"K2": 8, "K3": 2}[k_of]),
                                                                       (3, {"K2": 4, "K3": 4}[k_of])]
    assert [l.args["b2_ptr"] for l in by_role["y_fused"][1:]] == [Bs[0], Bs[2]]
    assert [(l.args["T"], l.args["R"]) for l in by_role[dh_db]] == [(5, 8), (3, 4)]
    assert [(l.args["M"], l.args["K1"], l.args["M_SPLIT"]) for l in by_role["dar"]] == [(10, 5, 8), (8, 3, 4)]


def test_grouped_custom_ops_pass_opcheck():
    ranks, experts, scales = [8, 12], [2, 3], [2.0, 0.5]
    case = make_case(7, 19, 23, ranks, experts, torch.float32)
    tp = torch.tensor([0, 1, -1, 1, 0, -1, 1], device=DEV)
    order, counts = TokenGroups.from_token_plugin(tp, 2)
    As, Bs, routers = (_plugin_slices(case["A"], ranks), _plugin_slices(case["B"], ranks, 1),
                       _plugin_slices(case["router"], experts))
    x = case["x"].clone().requires_grad_()
    fwd_args = (x, case["W"], case["b"], None, As, Bs, routers, order, list(counts), ranks, experts, scales,
                [0.1, 0.1], 123)
    torch.library.opcheck(torch.ops.hlora.grouped_fwd.default, fwd_args)
    with torch.no_grad():
        _, ul, h = torch.ops.hlora.grouped_fwd(*fwd_args)
    # compact, sorted by plugin: 5 routed rows, width max(R_p + k_p) = 15 and max(R_p) = 12, padded to 16
    assert ul.shape == (5, 15) and h.shape == (5, 12) and ul.stride() == (16, 1) and h.stride() == (16, 1)
    dy = torch.randn(7, 23, device=DEV)
    detached = [[t.detach() for t in ts] for ts in (As, Bs, routers)]
    bwd_args = (dy, x.detach(), case["W"], *detached, order, list(counts), ul, h, ranks, experts, scales, [0.1, 0.1],
                123, True, True)
    torch.library.opcheck(torch.ops.hlora.grouped_bwd.default, bwd_args)


def test_layer_mixed_batch_runs_grouped_on_the_plugins_own_parameters(monkeypatch):
    """HLoRALinear under per-sample routing: one grouped call reading each plugin's own Parameters
    (no stacked launch), gradients landing in each plugin's ``.grad``, equal to the torch backend."""
    import hlora

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(19, 23)).to(DEV)
    plugins = {"comp": hlora.PluginConfig(rank=8, num_experts=2, alpha=16),
               "gen": hlora.PluginConfig(rank=12, num_experts=3, alpha=8)}
    hlora.inject(model, hlora.HLoRAConfig(plugins=plugins))
    layer = hlora.adapter_layers(model)[0]
    with torch.no_grad():
        for p in layer.plugins.values():
            p.B.normal_(0.0, 0.3)
    hlora.set_task(model, ["gen", None, "comp", "gen"])
    x = torch.randn(4, 3, 19, device=DEV)
    calls = []
    for name in ("grouped_forward", "hlora_forward"):
        real = getattr(fused_linear, name)
        monkeypatch.setattr(fused_linear, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("HLORA_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.pow(2).sum().backward()
        results[backend] = [y.detach()] + [p.grad for n in ("comp", "gen") for p in layer.plugins[n].parameters()]
    assert calls == ["grouped_forward"]
    for got, want in zip(*results.values()):
        assert want is not None and want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# the gate in the GEMM epilogues
# ----------------------------------------------------------------------------------------------


def _recorded_roles(ranks, experts, T=40, grouped=False, dropout=0.0):
    from hlora.kernels import compile_gate  # the launchers' plan on meta tensors (nothing runs)

    return compile_gate.plan(T, 24, 20, ranks, experts, "fused", dropout, grouped=grouped)


def test_gate_epilogue_is_chosen_by_shape():
    """One plugin (the M3 comprehension plugin, 64 + 4; the generation plugin, 256 + 4): the gate
    runs in the UL GEMM's epilogue and its backward in dh_db's, no gate launch. 64 + 4 columns fit
    one UL tile; the 256 rank columns of the wider plugin are tiled, each tile recomputing the 4
    logits (ROUTER_ACC), and its 256 ranks span four dy-pass rank blocks, which leave their shares
    of the per-expert sums to one small gate_logits launch. With dropout the forward keeps the gate
    kernel (its epilogue spilled); the weight gradients share one zero fill and one cast launch
    (two plugins' six too); grouped, each plugin is decided alone; stacked plugins keep the gate kernels."""
    launches = _recorded_roles((64,), (4,))
    assert [l.role for l in launches] == ["ul_gate", "y_fused", "dh_db_gate", "dx_fused", "dar", "cast_grads"]
    ul, dh = launches[0], launches[2]
    assert ul.consts["GATE"] and not ul.consts["ROUTER_ACC"] and not ul.consts["GATE_DROPOUT"]
    assert ul.consts["K_PAD"] == 4 and not dh.consts["PARTIAL"]
    assert [l.role for l in _recorded_roles((64,), (4,), dropout=0.1)][:2] == ["ul", "gate_fwd"]
    assert all(t["BLOCK_N"] >= 68 for t in ul.tiles) and all(ul.grid(t)[0] == -(-40 // t["BLOCK_M"]) for t in ul.tiles)
    assert all(t["BLOCK_R"] >= 64 for t in dh.tiles) and dh.args["dh_ptr"].shape[1] == fused_linear.padded(68)
    cast = launches[-1]
    assert [cast.args[f"e{j}"] for j in range(6)] == [64 * 24, 64 * 24 + 20 * 64] + [64 * 24 + 20 * 64 + 4 * 24] * 4

    wide = _recorded_roles((256,), (4,))
    assert [l.role for l in wide] == ["ul_gate", "y_fused", "dh_db_gate", "gate_logits", "dx_fused", "dar",
                                      "cast_grads"]
    ul, dh, logits = wide[0], wide[2], wide[3]
    assert ul.consts["ROUTER_ACC"] and ul.consts["K_PAD"] == 16 and ul.args["N"] == ul.args["N_SPLIT"] == 256
    assert all(t["BLOCK_N"] <= 128 for t in ul.tiles)  # several rank tiles per row block
    assert dh.consts["PARTIAL"] and all(t["BLOCK_R"] == 64 for t in dh.tiles)
    assert logits.args["BLOCKS"] == 4 and dh.args["dg_ptr"] is logits.args["dg_ptr"]

    grouped = _recorded_roles((64, 256), (4, 4), grouped=True)
    assert [l.role for l in grouped if l.role not in ("y_fused", "dx_fused", "dar")] == [
        "ul_gate", "ul_gate", "dh_db_gate", "dh_db_gate", "gate_logits", "cast_grads"]  # one cast for both plugins
    assert [l.args["GATE_Q"] for l in grouped if l.role in ("ul_gate", "dh_db_gate", "gate_logits")] == [0, 1, 0, 1, 1]
    assert next(l for l in grouped if l.role == "gate_logits").grid({"BLOCK_T": 4}) == (5,)  # plugin 1's 20 rows
    stacked = [l.role for l in _recorded_roles((8, 12), (2, 3))]  # columns not adjacent
    assert "ul_gate" not in stacked and "gate_fwd" in stacked and "gate_bwd" in stacked


EPILOGUE_CASES = {
    # name: (T, D, N, ranks, experts, scales, routing (None: one plugin, no routing tensor), base,
    #        the dy pass's rank block (GATE_BLOCK_R: smaller than the rank reaches PARTIAL))
    "routed-odd": (9, 19, 23, (15,), (5,), (1.5,), [0, -1, 0, 0, -1, 0, 0, 0, -1], "weight", 64),
    "one-token": (1, 21, 17, (12,), (3,), (2.0,), None, "weight", 64),
    "trainable-module-base": (10, 19, 23, (8,), (4,), (0.5,), None, "module", 64),
    "grouped-empty-and-unrouted": (11, 21, 17, (4, 12, 6), (1, 3, 2), (1.0, 0.5, 3.0),
                                   [2, 0, -1, 2, 2, 0, -1, 0, 2, 2, 0], "weight", 64),
    # experts of 6 ranks across rank blocks of 16: the shares of dg split experts
    "partial-routed-odd": (9, 19, 23, (36,), (6,), (1.5,), [0, -1, 0, 0, -1, 0, 0, 0, -1], "weight", 16),
    # 130 + 5 columns: rank tiles with recomputed logits forward, partial rank blocks backward
    "wide-one-plugin": (37, 19, 23, (130,), (5,), (0.5,), None, "weight", 16),
    # 32 experts of 5 ranks: a 32-wide logits tile in the rank tiles, experts across rank blocks
    "wide-many-experts": (20, 21, 17, (160,), (32,), (1.0,), None, "weight", 16),
    "grouped-one-wide-plugin": (9, 19, 23, (8, 126), (2, 3), (2.0, 0.5), [1, 0, 0, -1, 1, 0, 1, 1, 0], "weight", 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(EPILOGUE_CASES))
def test_gate_epilogue_matches_float64(name, dtype, monkeypatch):
    """Forward and every gradient through the epilogue path (float32 adapter weights rounded to x's
    dtype after their loads), poisoned outputs; with a trainable base module its weight and bias
    gradients too; a plugin without tokens gets exactly zero gradients."""
    T, D, N, ranks, experts, scales, routing, base, block_r = EPILOGUE_CASES[name]
    monkeypatch.setattr(fused_linear, "GATE_BLOCK_R", block_r)
    grouped = len(ranks) > 1
    case = make_case(T, D, N, ranks, experts, dtype)
    tp = torch.tensor(routing, device=DEV) if routing is not None else None
    launches = _recorded_roles(ranks, experts, T=T, grouped=grouped, dropout=0.0)
    roles = [l.role for l in launches]
    assert "gate_fwd" not in roles and "gate_bwd" not in roles
    uls = [l for l in launches if l.role == "ul_gate"]
    dhs = [l for l in launches if l.role == "dh_db_gate"]
    assert len(uls) == len(dhs) == len(ranks)  # the plan shares the tokens evenly: every plugin has some
    for p, ul, dh in zip(range(len(ranks)), uls, dhs):  # the paths the case's name promises
        assert ul.consts["ROUTER_ACC"] == (ranks[p] + experts[p] > 128)
        assert dh.consts["PARTIAL"] == (ranks[p] > block_r)
    assert roles.count("gate_logits") == sum(r > block_r for r in ranks)
    module, case_run = module_base(case, trainable=True) if base == "module" else (None, case)
    y, w, grads = (run_grouped if grouped else run)(case_run, ranks, experts, scales, tp)
    assert_matches_reference(y, w, grads, case, ranks, experts, scales, tp, dtype)
    if module is not None:  # dy reaches the base module's own autograd
        W64 = case["W"].double().requires_grad_()
        b64 = case["b"].double().requires_grad_()
        c = {k: (v.double() if v is not None else None) for k, v in case.items()}
        y64 = reference(c["x"], W64, b64, c["A"], c["B"], c["router"], ranks, experts, scales, tp)
        (y64 * w.double()).sum().backward()
        assert_near(module.weight.grad, W64.grad, 2 * TOL[dtype], "dW")
        assert_near(module.bias.grad, b64.grad, 2 * TOL[dtype], "dbias")
    if routing is not None:  # a plugin without tokens gets exactly zero gradients
        assert_idle_plugins_get_no_gradient(grads, ranks, experts, routing)


@pytest.mark.parametrize("ranks, experts, block_r", [((12,), (3,), 64), ((36,), (6,), 16)], ids=["one-block", "partial"])
def test_gate_epilogue_backward_recomputes_the_forwards_dropout_mask(ranks, experts, block_r, monkeypatch):
    """One plugin with a routing tensor and dropout: the forward's gate kernel draws the mask, the
    backward's epilogue (dh_db_gate, in one rank block or in several) recomputes it from the same
    Philox offsets: the gradients equal float64 with the mask read from the forward."""
    monkeypatch.setattr(fused_linear, "GATE_BLOCK_R", block_r)
    scales, dropouts = (2.0,), (0.4,)
    launches = _recorded_roles(ranks, experts, dropout=0.4)
    assert [l.role for l in launches][2:4] == ["y_fused", "dh_db_gate"]
    assert launches[3].consts["PARTIAL"] == (ranks[0] > block_r)
    keep, live, tp = _probe_mask(ranks, experts, scales, dropouts, T=24, seed=3)
    assert 0.4 < keep[live].mean().item() < 0.8
    assert_dropout_run_matches_mask(make_case(24, 19, 17, ranks, experts, torch.float32), ranks, experts, scales,
                                    dropouts, tp, keep, seed=3)
