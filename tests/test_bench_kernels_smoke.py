"""benchmarks/bench_kernels.py on a CPU (``--smoke``): the JSON gpu_check.sh writes, and every
provider's output and input gradient against an independent float64 formula (no timings asserted).

The kernels run in the Triton interpreter here, as in tests/test_kernels.py: ``TRITON_INTERPRET=1``
is set before the first kernel call defines them (reloading the module if another test defined
them without it)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU stand-in; gpu_check.sh runs the real one"),
]

if not torch.cuda.is_available():  # on a GPU machine this module is skipped and must not switch the interpreter on
    os.environ["TRITON_INTERPRET"] = "1"
    _loaded = sys.modules.get("hlora.kernels.fused_linear")
    if _loaded is not None and not _loaded.INTERPRET:
        importlib.reload(_loaded)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "benchmarks", "bench_kernels.py"))
bm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_kernels", bm)
_spec.loader.exec_module(bm)

ROW_KEYS = {"proj", "R", "k", "mix", "provider", "ms", "ratio_to_base"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    status = bm.main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    return status, data


def test_smoke_json_has_every_provider_case_and_a_consistent_ratio(result):
    status, data = result
    assert {"device", "torch", "triton", "date", "rows"} <= set(data)
    assert status == 0, [(r["provider"], r["mix"], r["status"]) for r in data["rows"] if r["status"].startswith("FAILED")]
    assert data["torch"] == torch.__version__
    rows = data["rows"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert {r["provider"] for r in rows} == set(bm.PROVIDERS) | set(bm.GEMM_PROVIDERS)
    assert {r["mix"] for r in rows} == {"gemm y", "gemm dx", "base", "comp", "comp+gen 50/50", "sweep"}
    assert {r["k"] for r in rows if r["mix"] == "sweep"} == {2, 32}
    ran = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] != "ok"]
    # what the kernels cannot do yet is reported, never silently timed as something else
    for r in skipped:
        assert r["status"].startswith("skipped: ") and r["ms"] is None and r["ratio_to_base"] is None
        assert r["provider"] == "hlora_cublas" and "cublas" not in (data["strategies"] or ())
    assert {r["provider"] for r in ran} >= set(bm.PROVIDERS) - {"hlora_cublas"}
    for r in ran:  # the strategy the kernels ran, as they report it
        want = {"hlora_fused": "fused", "hlora_cublas": "cublas"}.get(r["provider"])
        assert r["strategy"] == want if r["provider"] != "hlora_auto" else r["strategy"].startswith("auto: ")
    base = {r["proj"]: r["ms"] for r in rows if r["provider"] == "base"}
    cublas = {(r["proj"], r["mix"]): r["ms"] for r in rows if r["provider"] == "cublas_gemm"}
    for r in ran:
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert r["err_y"] <= bm.TOL[torch.float32]
        ref = cublas[(r["proj"], r["mix"])] if r["mix"].startswith("gemm") else base[r["proj"]]
        assert r["ratio_to_base"] == pytest.approx(r["ms"] / ref)


# ----------------------------------------------------------------------------------------------
# every provider against the formula, written here in float64 as k separate experts
# ----------------------------------------------------------------------------------------------


def formula(c, x, which):
    """y [T, N] in float64: W0 x, + s B A x (PEFT), or the routed mixture of k experts per plugin."""
    W = c.W.double()
    y = x @ W.t()
    if which == "lora":
        return y + c.scales[0] * (x @ c.A.double().t()) @ c.B.double().t()
    if which == "base":
        return y
    tokens = x.shape[0]
    plugin_of_token = c.per_sample.repeat_interleave(tokens // 2) if c.per_sample is not None else torch.zeros(tokens, dtype=torch.long)
    r0 = k0 = 0
    for q, (R, k) in enumerate(c.plugins):
        gates = torch.softmax(x @ c.router[k0 : k0 + k].double().t(), dim=1)
        r = R // k
        for i in range(k):
            A_i = c.A[r0 + i * r : r0 + (i + 1) * r].double()
            B_i = c.B[:, r0 + i * r : r0 + (i + 1) * r].double()
            mixed = c.scales[q] * gates[:, i : i + 1] * (x @ A_i.t()) @ B_i.t()
            y = y + mixed * (plugin_of_token == q)[:, None].double()
        r0, k0 = r0 + R, k0 + k
    return y


CASES = {"one plugin": ((8, 4),), "50/50 two plugins": ((8, 4), (12, 3))}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", bm.PROVIDERS)
def test_every_provider_computes_its_formula_on_the_case_weights(provider, case):
    plugins = CASES[case]
    c = bm.Case("odd", 13, 11, 14, plugins, case, torch.float32, "cpu", seed=3)
    if provider == "peft_lora" and len(plugins) > 1:
        with pytest.raises(bm.Skip, match="PEFT"):
            bm.BUILDERS[provider](c, True)
        return
    with bm.env(**bm.provider_env(provider)):
        fwd, params, _ = bm.BUILDERS[provider](c, True)
        x = c.x.clone().requires_grad_()
        y = fwd(x)
        dx, *dparams = torch.autograd.grad(y, [x] + list(params), c.dy)
    which = "base" if provider == "base" else "lora" if provider == "peft_lora" else "hlora"
    x64 = c.x.double().reshape(c.T, c.D).requires_grad_()
    y64 = formula(c, x64, which)
    (dx64,) = torch.autograd.grad(y64, x64, c.dy.double().reshape(c.T, c.N))
    torch.testing.assert_close(y.detach().double().reshape(c.T, c.N), y64.detach(), rtol=1e-4, atol=1e-4 * y64.abs().max().item())
    torch.testing.assert_close(dx.double().reshape(c.T, c.D), dx64, rtol=1e-4, atol=1e-4 * dx64.abs().max().item())
    per_plugin = {"base": lambda k: 0, "peft_lora": lambda k: 2, "moelora_loop": lambda k: 2 * k + 1}
    assert len(dparams) == sum(per_plugin.get(provider, lambda k: 3)(k) for _, k in plugins)  # hlora: A, B, router
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in dparams)
