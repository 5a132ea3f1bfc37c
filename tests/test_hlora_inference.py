"""The no-grad inference paths of the torch backend (issue 16): ``hlora_reference`` without the
autograd bookkeeping, and a layer's cached stack of its plugins for mixed batches. Both against the
float64 expert-by-expert formula, and the fast path bit for bit against the autograd path."""

import math

import pytest
import torch

import hlora
from hlora.kernels.reference import hlora_reference

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def reference(x, W, b, plugins, token_plugin=None):
    """float64, expert by expert: y = W x + b + s_p sum_i g_i B_i A_i x for each token's plugin p."""
    x, W = x.double(), W.double()
    y = x @ W.t() + (b.double() if b is not None else 0.0)
    for p, (A, B, router, k, s) in enumerate(plugins):
        A, B, router = A.double(), B.double(), router.double()
        r = A.shape[0] // k
        g = torch.softmax(x @ router.t(), dim=-1)
        delta = sum(s * g[:, i : i + 1] * (x @ A[i * r : (i + 1) * r].t() @ B[:, i * r : (i + 1) * r].t()) for i in range(k))
        y = y + (delta if token_plugin is None else (token_plugin == p).double()[:, None] * delta)
    return y


def make(d_in, d_out, specs, dtype, seed=0):
    """Random non-zero weights; specs = [(R, k, scale), ...]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1])).to(dtype)
    return rnd(d_out, d_in), rnd(d_out), [(rnd(R, d_in), rnd(d_out, R), rnd(k, d_in) * 3, k, s) for R, k, s in specs]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("HLORA_BACKEND", "torch")


def _stacked_args(plugins):
    return (torch.cat([p[0] for p in plugins]), torch.cat([p[1] for p in plugins], 1), torch.cat([p[2] for p in plugins]),
            tuple(p[0].shape[0] for p in plugins), tuple(p[3] for p in plugins), tuple(p[4] for p in plugins))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,d_in,d_out,specs", [
    (1, 7, 5, [(4, 2, 2.0)]),  # a decode step of one row
    (1, 9, 6, [(6, 3, 1.5), (4, 1, 0.7)]),  # one token, two plugins stacked
    (13, 19, 23, [(12, 3, 8.0)]),
    (17, 10, 21, [(8, 2, 4.0), (15, 5, 1.5), (6, 6, 3.0)]),  # mixed routing, some tokens unrouted
])
def test_inference_path_is_the_autograd_path_bit_for_bit_and_matches_float64(dtype, T, d_in, d_out, specs):
    W, b, plugins = make(d_in, d_out, specs, dtype, seed=T + d_in)
    A, B, router, ranks, experts, scales = _stacked_args(plugins)
    x = torch.randn(T, d_in, dtype=dtype, generator=torch.Generator().manual_seed(d_out))
    tp = None
    if len(specs) > 1:
        tp = torch.randint(-1, len(specs), (T,), generator=torch.Generator().manual_seed(2)).to(torch.int32)
        if T > 1:
            tp[0] = -1  # at least one unrouted token
    args = (W, b, A, B, router, ranks, experts, scales, tp, (0.0,) * len(specs))
    with torch.no_grad():
        fast = hlora_reference(x, *args)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, router)]
    graph = hlora_reference(leaves[0], W, b, *leaves[1:], *args[5:])
    assert graph.grad_fn is not None and fast.grad_fn is None
    assert torch.equal(fast, graph.detach())  # the same ops in the same order
    want = reference(x, W, b, plugins, tp)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.double(), want, **TOL[dtype])
    if tp is not None and T > 1:
        torch.testing.assert_close(fast[0].double(), (x[0].double() @ W.double().t() + b.double()), **TOL[dtype])
    fast.fill_(float("nan"))  # the result owns its memory: the next call is unaffected
    with torch.no_grad():
        again = hlora_reference(x, *args)
    torch.testing.assert_close(again.double(), want, **TOL[dtype])


def _mixed_layer(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(11, 9))
    cfg = hlora.HLoRAConfig(plugins={"comp": dict(rank=6, num_experts=3, alpha=4.0), "gen": dict(rank=8, num_experts=2, alpha=2.0)},
                            target_modules=["0"])
    hlora.inject(model, cfg)
    layer = model[0]
    with torch.no_grad():
        for p in layer.plugins.values():
            p.B.normal_()
            p.router.mul_(3)
    return model.to(dtype), layer


def _layer_reference(layer, x, tasks):
    names = layer.plugin_names
    plugins = [(layer.plugins[n].A, layer.plugins[n].B, layer.plugins[n].router, layer.plugins[n].num_experts,
                layer.plugins[n].scale) for n in names]
    tp = torch.tensor([-1 if t is None else names.index(t) for t in tasks]).repeat_interleave(x.shape[1])
    return reference(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias, plugins, tp).view(*x.shape[:-1], -1)


def test_mixed_batch_stack_is_cached_for_inference_and_rebuilt_when_a_plugin_changes():
    model, layer = _mixed_layer()
    tasks = ["gen", None, "comp", "gen", "comp"]
    hlora.set_task(model, tasks)
    x = torch.randn(5, 3, 11)
    with torch.no_grad():
        y = model(x)
        stack = layer._stack_cache[2]
        torch.testing.assert_close(y.double(), _layer_reference(layer, x, tasks), **TOL[torch.float32])
        y.fill_(float("nan"))
        again = model(x)
        assert all(a is b for a, b in zip(layer._stack_cache[2], stack))  # reused, not rebuilt
        torch.testing.assert_close(again.double(), _layer_reference(layer, x, tasks), **TOL[torch.float32])
        layer.plugins["gen"].B.add_(0.5)  # an in-place write (optimizer step, load_state_dict)
        changed = model(x)
        assert layer._stack_cache[2][1] is not stack[1]
        torch.testing.assert_close(changed.double(), _layer_reference(layer, x, tasks), **TOL[torch.float32])
        assert not torch.allclose(changed, again)
    model.double()  # new storage, new dtype
    with torch.no_grad():
        y64 = model(x.double())
    assert layer._stack_cache[2][0].dtype == torch.float64
    torch.testing.assert_close(y64, _layer_reference(layer, x, tasks), **TOL[torch.float64])


def test_mixed_batch_training_concatenates_under_autograd():
    """With gradients on, the stack is built in the graph (no cached copy): every plugin's A, B and
    router get the float64 formula's gradients, and the cache plays no part."""
    model, layer = _mixed_layer(torch.float64)
    tasks = ["comp", "gen", None, "gen"]
    hlora.set_task(model, tasks)
    x = torch.randn(4, 2, 11, dtype=torch.float64, requires_grad=True)
    layer._stack_cache = None
    y = model(x)
    assert layer._stack_cache is None
    params = [t for n in layer.plugin_names for t in (layer.plugins[n].A, layer.plugins[n].B, layer.plugins[n].router)]
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *params])
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in [x, *params]]
    it = iter(ref_leaves[1:])
    names = layer.plugin_names
    ref_plugins = [(next(it), next(it), next(it), layer.plugins[n].num_experts, layer.plugins[n].scale) for n in names]
    tp = torch.tensor([-1 if t is None else names.index(t) for t in tasks]).repeat_interleave(2)
    y_ref = reference(ref_leaves[0].reshape(-1, 11), layer.weight, layer.bias, ref_plugins, tp).view(4, 2, -1)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    ref_grads = torch.autograd.grad((y_ref * w).sum(), ref_leaves)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[torch.float64])
