"""The H-LoRA op against an independent float64 formula, the MoELoRA loop and plain LoRA."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hlora
from hlora.functional import hlora_linear, router_gates
from hlora.layer import HLoRALinear, LoRALinear, MoELoRALinear

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def reference(x, W, b, plugins, token_plugin=None):
    """float64, expert by expert: y = W x + b + s_p sum_i g_i B_i A_i x for each token's plugin p."""
    x, W = x.double(), W.double()
    T = x.shape[0]
    y = x @ W.t() + (b.double() if b is not None else 0.0)
    for p, (A, B, router, k, s) in enumerate(plugins):
        A, B, router = A.double(), B.double(), router.double()
        r = A.shape[0] // k
        g = torch.softmax(x @ router.t(), dim=-1)
        delta = torch.zeros(T, W.shape[0], dtype=torch.float64)
        for i in range(k):
            delta = delta + s * g[:, i : i + 1] * (x @ A[i * r : (i + 1) * r].t() @ B[:, i * r : (i + 1) * r].t())
        mask = torch.ones(T, 1, dtype=torch.float64) if token_plugin is None else (token_plugin == p).double()[:, None]
        y = y + mask * delta
    return y


def make(d_in, d_out, specs, dtype, seed=0):
    """Random non-zero weights; specs = [(R, k, scale), ...]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1])).to(dtype)
    W, b = rnd(d_out, d_in), rnd(d_out)
    plugins = [(rnd(R, d_in), rnd(d_out, R), rnd(k, d_in) * 3, k, s) for R, k, s in specs]
    return W, b, plugins


def run(x, W, b, plugins, token_plugin=None, **kw):
    return hlora_linear(
        x, W, b,
        torch.cat([p[0] for p in plugins]), torch.cat([p[1] for p in plugins], 1), torch.cat([p[2] for p in plugins]),
        [p[0].shape[0] for p in plugins], [p[3] for p in plugins], [p[4] for p in plugins], token_plugin, **kw,
    )


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("HLORA_BACKEND", "torch")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,d_in,d_out,specs", [
    (1, 7, 5, [(4, 2, 2.0)]),
    (13, 19, 23, [(12, 3, 8.0)]),
    (9, 16, 11, [(8, 1, 0.5)]),
    (17, 10, 21, [(8, 2, 4.0), (15, 5, 1.5), (6, 6, 3.0)]),
])
def test_forward_and_gradients_match_float64_formula(dtype, T, d_in, d_out, specs):
    W, b, plugins = make(d_in, d_out, specs, dtype, seed=T)
    x = torch.randn(T, d_in, dtype=dtype)
    token_plugin = None if len(specs) == 1 else torch.randint(-1, len(specs), (T,), generator=torch.Generator().manual_seed(1))
    leaves = [x] + [t for p in plugins for t in p[:3]]
    for t in leaves:
        t.requires_grad_(True)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(ref_leaves[1:])
    ref_plugins = [(next(it), next(it), next(it), k, s) for *_, k, s in plugins]
    y = run(x, W, b, plugins, token_plugin)
    y_ref = reference(ref_leaves[0], W, b, ref_plugins, token_plugin)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    w = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y.double() * w).sum(), leaves)
    ref_grads = torch.autograd.grad((y_ref * w).sum(), ref_leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


def test_tokens_routed_to_no_plugin_get_exactly_the_base_output():
    W, b, plugins = make(12, 9, [(8, 2, 8.0), (6, 3, 2.0)], torch.float32)
    x = torch.randn(2, 5, 12)
    token_plugin = torch.tensor([0, -1, 1, -1, 0, 1, -1, -1, 0, 1])
    y = run(x, W, b, plugins, token_plugin)
    base = torch.nn.functional.linear(x, W, b).reshape(-1, 9)
    none = token_plugin == -1
    assert torch.equal(y.reshape(-1, 9)[none], base[none])
    assert not torch.allclose(y.reshape(-1, 9)[~none], base[~none])


def test_concatenated_layer_equals_moelora_loop_and_lora_at_k1():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 18)
    cfg = {"t": hlora.PluginConfig(rank=12, num_experts=4, alpha=24.0)}
    h = HLoRALinear(base, cfg, ["t"])
    m = MoELoRALinear(base, cfg, ["t"])
    p = h.plugins["t"]
    with torch.no_grad():
        p.B.normal_()
        m.plugins["t"].router.copy_(p.router)
        for i, e in enumerate(m.plugins["t"].experts):
            e.A.copy_(p.A[3 * i : 3 * i + 3])
            e.B.copy_(p.B[:, 3 * i : 3 * i + 3])
    for layer in (h, m):
        layer.set_routing(0)
    x = torch.randn(3, 7, 24, dtype=torch.float32)
    torch.testing.assert_close(h(x), m(x), rtol=2e-5, atol=2e-5)

    cfg1 = {"t": hlora.PluginConfig(rank=6, num_experts=1, alpha=12.0)}
    h1, l1 = HLoRALinear(base, cfg1, ["t"]), LoRALinear(base, cfg1, ["t"])
    with torch.no_grad():
        h1.plugins["t"].B.normal_()
        l1.plugins["t"].A.copy_(h1.plugins["t"].A)
        l1.plugins["t"].B.copy_(h1.plugins["t"].B)
    h1.set_routing(0), l1.set_routing(0)
    torch.testing.assert_close(h1(x), l1(x), rtol=2e-5, atol=2e-5)


def test_dropout_is_seeded_off_in_eval_and_unbiased():
    W, b, plugins = make(16, 12, [(8, 2, 2.0)], torch.float64)
    x = torch.randn(6, 16, dtype=torch.float64)
    clean = run(x, W, b, plugins)
    torch.manual_seed(5)
    y1 = run(x, W, b, plugins, dropout=0.3, training=True)
    torch.manual_seed(5)
    y2 = run(x, W, b, plugins, dropout=0.3, training=True)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, clean)
    assert torch.equal(run(x, W, b, plugins, dropout=0.3, training=False), clean)
    draws = torch.stack([run(x, W, b, plugins, dropout=0.3, training=True) for _ in range(4000)])
    spread = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - clean).abs() <= 5 * spread + 1e-9).all()


def test_peaked_router_flushes_negligible_gates_to_exact_zero():
    logits = torch.tensor([[0.0, -50.0, -90.0, -200.0], [300.0, 0.0, 299.0, 1.0]])
    g = router_gates(logits)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((g > 0) & (g < tiny)).any(), "subnormal gate weights reach the GEMMs"
    assert g[0, 2] == 0 and g[0, 3] == 0 and g[1, 1] == 0 and g[1, 3] == 0
    torch.testing.assert_close(g[0, 1], torch.exp(torch.tensor(-50.0)) / (1 + torch.exp(torch.tensor(-50.0))))
    torch.testing.assert_close(g.sum(-1), torch.ones(2))
    assert torch.isnan(router_gates(torch.tensor([[float("nan"), 0.0]]))).all()


def test_bad_arguments_name_the_problem(monkeypatch):
    W, b, plugins = make(8, 6, [(4, 2, 1.0)], torch.float32)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="d_in=8"):
        run(torch.randn(3, 9), W, b, plugins)
    with pytest.raises(ValueError, match="one plugin index per token"):
        run(x, W, b, plugins, torch.zeros(4, dtype=torch.int64))
    A, B, router = plugins[0][:3]
    with pytest.raises(ValueError, match="B has shape"):
        hlora_linear(x, W, b, A, B[:, :3], router, [4], [2], [1.0])
    with pytest.raises(ValueError, match="not divisible"):
        hlora_linear(x, W, b, A, B, torch.randn(3, 8), [4], [3], [1.0])
    monkeypatch.setenv("HLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="HLORA_BACKEND"):
        run(x, W, b, plugins)


def test_plugin_config_validates():
    with pytest.raises(ValueError, match="divisible by num_experts=3"):
        hlora.PluginConfig(rank=64, num_experts=3, alpha=16)
    with pytest.raises(ValueError, match="dropout"):
        hlora.PluginConfig(rank=8, num_experts=2, alpha=16, dropout=1.5)
    p = hlora.PluginConfig(rank=64, num_experts=4, alpha=128)
    assert p.expert_rank == 16 and p.scale == 8.0
    cfg = hlora.HLoRAConfig(plugins={"comp": p, "gen": hlora.PluginConfig(256, 4, 512, dropout=0.05)},
                            target_modules=["q_proj", "v_proj"], layers_to_transform=[0], modules_to_save=["lm_head"])
    again = hlora.HLoRAConfig.from_json(cfg.to_json())
    assert again == cfg and again.plugin_names == ["comp", "gen"]
    with pytest.raises(ValueError, match="unknown HLoRAConfig fields"):
        hlora.HLoRAConfig.from_dict({**cfg.to_dict(), "rank": 3})


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 9),
    d_in=st.integers(1, 13),
    d_out=st.integers(1, 11),
    plugins=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4), st.floats(0.1, 8.0)), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_routing_matches_the_formula(T, d_in, d_out, plugins, seed):
    specs = [(r * k, k, s) for r, k, s in plugins]  # r per expert, k experts
    W, b, ps = make(d_in, d_out, specs, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    token_plugin = None if len(specs) == 1 else torch.randint(-1, len(specs), (T,), generator=g)
    torch.testing.assert_close(run(x, W, b, ps, token_plugin), reference(x, W, b, ps, token_plugin), **TOL[torch.float64])


def _two_plugin_case(T=7, d_in=9, d_out=6, dtype=torch.float64):
    """Two plugins with different k (R=6 in k=3, R=4 in k=2), mixed routing with a -1 token."""
    W, b, ps = make(d_in, d_out, [(6, 3, 1.5), (4, 2, 0.7)], dtype, seed=T)
    g = torch.Generator().manual_seed(T + 1)
    x = torch.randn(T, d_in, generator=g, dtype=dtype)
    token_plugin = torch.tensor([0, 1, -1, 1, 0, 0, 1][:T])
    A, B, router = (torch.cat([p[i] for p in ps], dim=int(i == 1)) for i in range(3))
    return x, W, b, A, B, router, token_plugin


def _plain_adapter(x, A, B, router, token_plugin, dropouts, ranks=(6, 4), experts=(3, 2), scales=(1.5, 0.7)):
    """h B^T in plain torch ops (autograd differentiates it): per plugin dropout(s u) * repeat(softmax)."""
    hs = []
    for p, (u, logits, k, s, q) in enumerate(zip((x @ A.t()).split(ranks, 1), (x @ router.t()).split(experts, 1),
                                                  experts, scales, dropouts)):
        g = torch.softmax(logits, dim=-1) * (token_plugin == p).to(x.dtype)[:, None]
        hs.append(torch.nn.functional.dropout(s * u, q, training=True) * g.repeat_interleave(u.shape[1] // k, dim=1))
    return torch.cat(hs, dim=1) @ B.t()


def test_gated_up_projection_gradcheck_and_matches_plain_ops_with_dropout():
    """The hand-written backward of the reference path (which recomputes h) against autograd
    numerics and against plain torch ops drawing the same dropout masks."""
    from hlora.kernels.reference import hlora_reference

    x, W, b, A, B, router, tp = _two_plugin_case()
    dropouts = (0.3, 0.5)

    def fused(x, A, B, router):
        with torch.random.fork_rng():
            torch.manual_seed(11)
            return hlora_reference(x, W, b, A, B, router, (6, 4), (3, 2), (1.5, 0.7), tp.to(torch.int32), dropouts)

    def plain(x, A, B, router):
        with torch.random.fork_rng():
            torch.manual_seed(11)
            return x @ W.t() + b + _plain_adapter(x, A, B, router, tp, dropouts)

    inputs = [t.clone().requires_grad_(True) for t in (x, A, B, router)]
    assert torch.autograd.gradcheck(fused, inputs)
    y = fused(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y_ref = plain(*ref_inputs)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    for got, want in zip(grads, torch.autograd.grad(y_ref, ref_inputs, dy)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    # the masks are really drawn: another seed changes the output
    with torch.random.fork_rng():
        torch.manual_seed(12)
        other = hlora_reference(x, W, b, A, B, router, (6, 4), (3, 2), (1.5, 0.7), tp.to(torch.int32), dropouts)
    assert not torch.allclose(other, y.detach())


def test_gated_up_projection_forward_is_bitwise_the_plain_rank_space():
    from hlora.kernels.reference import hlora_reference, rank_space

    x, W, b, A, B, router, tp = _two_plugin_case(T=7, d_in=13, d_out=11, dtype=torch.float32)
    args = ((6, 4), (3, 2), (1.5, 0.7), tp.to(torch.int32), (0.2, 0.4))
    torch.manual_seed(4)
    y = hlora_reference(x, W, b, A, B, router, *args)
    torch.manual_seed(4)
    assert torch.equal(y, torch.addmm(torch.nn.functional.linear(x, W, b), rank_space(x, A, router, *args), B.t()))


def _saved_activation_bytes(fn, params):
    """Bytes of the unique non-parameter storages autograd saves for fn()'s backward."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_hlora_saves_no_more_activations_than_peft_lora(dropout):
    """H-LoRA's torch path keeps x, one [T, R] (u, dropped out), the gates [T, K] in float32 and
    the bool keep mask: PEFT LoRA's x + one [T, R] plus T*K*4 (+ T*R mask bytes with dropout)."""
    T, d_in, d_out = 33, 64, 48
    x, W, b, A, B, router, _ = _two_plugin_case(T=T, d_in=d_in, d_out=d_out, dtype=torch.float32)
    tp = torch.randint(-1, 2, (T,), generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    params = [W, b] + [t.requires_grad_(True) for t in (A, B, router)]
    R, K = A.shape[0], router.shape[0]
    hlora_bytes = _saved_activation_bytes(
        lambda: hlora_linear(x, W, b, A, B, router, [6, 4], [3, 2], [1.5, 0.7], tp, dropout=dropout, training=True),
        params)
    lora = lambda: torch.nn.functional.linear(x, W, b) + 2.0 * (x @ A.t()) @ B.t()  # noqa: E731
    lora_bytes = _saved_activation_bytes(lora, params)
    assert lora_bytes == x.nbytes + T * R * 4  # x and u: what PEFT keeps (with dropout 0)
    mask_bytes = T * R if dropout > 0 else 0
    assert hlora_bytes <= lora_bytes + T * K * 4 + mask_bytes
