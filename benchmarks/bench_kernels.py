#!/usr/bin/env python
"""Layer benchmark of the H-LoRA kernels against the frozen base and the baselines, as JSON.

``python benchmarks/bench_kernels.py [--out FILE] [--budget-s S]`` on a CUDA GPU (what
``benchmarks/gpu_check.sh`` runs); ``--smoke`` on a CPU: tiny shapes, float32, the Triton kernels
under ``TRITON_INTERPRET=1``, ``torch.compile`` with the eager backend, one timing run (CI checks
the JSON and every provider's numbers through it; its timings mean nothing).

What it times (fwd+bwd of one layer, ``triton.testing.do_bench`` medians, bf16, T = 8192 tokens as
2 samples of 4096, the Phi-3-mini projections of ``roofline.PROJECTIONS``):

1. GEMM rows: the Triton GEMM of ``hlora.kernels`` (``triton_gemm``) against ``F.linear``
   (``cublas_gemm``) for y = x W0^T and dx = dy W0: the number that decides the strategy.
2. Providers per projection: ``base`` (frozen F.linear, dx only), ``peft_lora`` (the peft library's
   LoRA of the same total rank and scale), ``moelora_loop`` (hlora ``variant="moelora"``: k expert
   pairs one by one), ``torch_compile`` (hlora's torch path under ``torch.compile(mode="max-autotune")``),
   ``hlora_fused`` / ``hlora_cublas`` / ``hlora_auto`` (the kernels with ``HLORA_STRATEGY`` set; the
   row's ``strategy`` says what ran: under ``auto`` the choice the kernels' tuner made per product).
   Cases (``mix``): ``comp`` (R=64, k=4), ``gen`` (R=256, k=4), ``comp+gen 50/50`` (one sample each,
   per-sample routing), ``sweep`` (R=64, k = 2..32).

Before timing, every provider's output y and input gradient dx are checked against an independent
float64 evaluation of its formula on the same weights (base: W0 x; PEFT: W0 x + s B A x; the others:
the H-LoRA mixture); a row whose numbers disagree is marked ``FAILED`` and the exit status is 1.
Rows past ``--budget-s`` seconds, and providers this machine cannot run, are ``skipped: <why>``.

Output: ``{"device", "torch", "triton", "date", "smoke", "hlora", "strategies", "rows": [{"proj", "R",
"k", "mix", "provider", "ms", "ratio_to_base", "p20_ms", "p80_ms", "status", "err_y", "err_dx",
"strategy"}]}``; ``ratio_to_base`` divides by the projection's ``base`` row (GEMM rows: by
``cublas_gemm`` of the same product). Default file: ``benchmarks/results/<date>-<gpu>.json``
(``--out-dir`` changes the folder, ``--out`` names the file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import re
import sys
import time

# --smoke runs the Triton kernels in the interpreter, which must be chosen before they are defined
if "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package
from roofline import COMP, GEN, KS, PROJECTIONS  # noqa: E402

import hlora  # noqa: E402
from hlora.config import PluginConfig  # noqa: E402
from hlora.layer import HLoRALinear, MoELoRALinear  # noqa: E402
from hlora.routing import Routing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDERS = ("base", "peft_lora", "moelora_loop", "torch_compile", "hlora_fused", "hlora_cublas", "hlora_auto")
GEMM_PROVIDERS = ("triton_gemm", "cublas_gemm")
HLORA_STRATEGY = {"hlora_fused": "fused", "hlora_cublas": "cublas", "hlora_auto": "auto"}
ALPHA_PER_RANK = 2.0  # alpha = 2 r: scale 2 for every plugin, as HealthGPT's configs
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}  # max |err| / max |ref|


class Skip(Exception):
    """A provider this run cannot time; the message says why."""


@contextlib.contextmanager
def env(**values):
    """Set (or with None, unset) environment variables for the block."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------
# one case: shared weights, the float64 reference
# ----------------------------------------------------------------------------------------------


class Case:
    """One projection and plugin mix: W0 [N, D], the stacked A [R, D], B [N, R], router [K, D],
    inputs x [2, T/2, D] and upstream gradient dy; ``per_sample`` [2] plugin index per sample or None."""

    def __init__(self, proj, D, N, T, plugins, mix, dtype, device, seed=0):
        self.proj, self.D, self.N, self.T, self.mix, self.dtype = proj, D, N, T, mix, dtype
        self.plugins = tuple(plugins)  # (rank, experts) per plugin
        self.per_sample = torch.tensor([0, 1]) if len(plugins) > 1 else None
        self.ranks = tuple(r for r, _ in plugins)
        self.experts = tuple(k for _, k in plugins)
        self.scales = tuple(ALPHA_PER_RANK for _ in plugins)  # alpha / r
        gen = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

        R, K = sum(self.ranks), sum(self.experts)
        self.W = rnd(N, D, scale=D**-0.5)
        self.A = rnd(R, D, scale=D**-0.5) if R else None
        self.B = rnd(N, R, scale=R**-0.5) if R else None
        self.router = rnd(K, D, scale=2 * D**-0.5) if R else None
        self.x = rnd(2, T // 2, D)
        self.dy = rnd(2, T // 2, N)
        self._ref = {}

    @property
    def R(self):
        return sum(self.ranks)

    @property
    def k(self):
        return sum(self.experts)

    def token_plugin(self):
        if self.per_sample is None:
            return None
        return self.per_sample.to(self.x.device).repeat_interleave(self.T // 2)

    def reference(self, formula):
        """(y, dx) in float64 for ``formula`` in base / lora / hlora, written out independently."""
        if formula not in self._ref:
            x = self.x.double().reshape(self.T, self.D).requires_grad_()
            y = x @ self.W.double().t()
            if formula == "lora":
                (R, k), s = self.plugins[0], self.scales[0]
                y = y + s * (x @ self.A.double().t()) @ self.B.double().t()
            elif formula == "hlora":
                tp, r0, k0 = self.token_plugin(), 0, 0
                for q, (R_q, k_q) in enumerate(self.plugins):
                    z = x @ self.router[k0 : k0 + k_q].double().t()
                    z = z - z.max(dim=1, keepdim=True).values.detach()
                    g = torch.softmax(torch.where(z < -60, torch.full_like(z, float("-inf")), z), dim=1)
                    if tp is not None:
                        g = g * (tp == q)[:, None].double()
                    u = self.scales[q] * (x @ self.A[r0 : r0 + R_q].double().t())
                    h = (u.view(self.T, k_q, R_q // k_q) * g[:, :, None]).reshape(self.T, R_q)
                    y = y + h @ self.B[:, r0 : r0 + R_q].double().t()
                    r0, k0 = r0 + R_q, k0 + k_q
            (dx,) = torch.autograd.grad(y, x, self.dy.double().reshape(self.T, self.N))
            self._ref[formula] = (y.detach(), dx)
        return self._ref[formula]


# ----------------------------------------------------------------------------------------------
# providers: each returns (forward of x, trainable tensors besides x, formula, reported strategy)
# ----------------------------------------------------------------------------------------------


def _base_linear(c: Case) -> nn.Linear:
    base = nn.Linear(c.D, c.N, bias=False, device=c.W.device, dtype=c.dtype)
    with torch.no_grad():
        base.weight.copy_(c.W)
    base.weight.requires_grad_(False)
    return base


def provider_base(c: Case, smoke: bool):
    return (lambda x: F.linear(x, c.W)), [], "base"


def provider_peft(c: Case, smoke: bool):
    if len(c.plugins) > 1:
        raise Skip("PEFT trains one adapter per batch (its adapter_names mixed batches are inference-only)")
    from peft import LoraConfig  # optional: only this provider needs peft
    from peft.tuners.lora.layer import Linear as LoraLinear

    R, s = c.R, c.scales[0]
    cfg = LoraConfig(r=R, lora_alpha=s * R, lora_dropout=0.0, target_modules=["x"])
    layer = LoraLinear(_base_linear(c), "default", config=cfg, r=R, lora_alpha=s * R, lora_dropout=0.0)
    layer.to(device=c.W.device, dtype=c.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(c.A)
        layer.lora_B["default"].weight.copy_(c.B)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight], "lora"


def _adapter_layer(cls, c: Case):
    """hlora's own layer class around a real nn.Linear, plugins filled with the case's weights."""
    names = [f"p{q}" for q in range(len(c.plugins))]
    plugins = {n: PluginConfig(R, k, ALPHA_PER_RANK * R // k) for n, (R, k) in zip(names, c.plugins)}
    layer = cls(_base_linear(c), plugins, names)
    layer.train()
    r0 = k0 = 0
    with torch.no_grad():
        for n, (R, k) in zip(names, c.plugins):
            p = layer.plugins[n]
            p.router.copy_(c.router[k0 : k0 + k])
            if cls is MoELoRALinear:
                r = R // k
                for i, e in enumerate(p.experts):
                    e.A.copy_(c.A[r0 + i * r : r0 + (i + 1) * r])
                    e.B.copy_(c.B[:, r0 + i * r : r0 + (i + 1) * r])
            else:
                p.A.copy_(c.A[r0 : r0 + R])
                p.B.copy_(c.B[:, r0 : r0 + R])
            r0, k0 = r0 + R, k0 + k
    layer.set_routing(Routing(tuple(range(len(names))), c.per_sample) if c.per_sample is not None else 0)
    return layer, [p for p in layer.parameters() if p.requires_grad]


def provider_moelora(c: Case, smoke: bool):
    layer, params = _adapter_layer(MoELoRALinear, c)
    return layer, params, "hlora"


def provider_torch_compile(c: Case, smoke: bool):
    layer, params = _adapter_layer(HLoRALinear, c)
    # every case compiles the same forward code again: without a reset, dynamo's recompile limit
    # would silently leave the later cases running eagerly
    torch._dynamo.reset()
    # smoke: the eager backend checks the wiring in seconds (max-autotune compiles for minutes on a CPU)
    compiled = torch.compile(layer, backend="eager") if smoke else torch.compile(layer, mode="max-autotune")
    return compiled, params, "hlora"


def provider_hlora(c: Case, smoke: bool):
    layer, params = _adapter_layer(HLoRALinear, c)
    return layer, params, "hlora"


BUILDERS = {
    "base": provider_base,
    "peft_lora": provider_peft,
    "moelora_loop": provider_moelora,
    "torch_compile": provider_torch_compile,
    "hlora_fused": provider_hlora,
    "hlora_cublas": provider_hlora,
    "hlora_auto": provider_hlora,
}


def provider_env(provider: str) -> dict:
    """Environment a provider runs under: the torch path for torch.compile, the kernels (and
    HLORA_STRATEGY) for hlora_*, the default elsewhere."""
    if provider == "torch_compile":
        return dict(HLORA_BACKEND="torch", HLORA_STRATEGY=None)
    if provider in HLORA_STRATEGY:
        return dict(HLORA_BACKEND="triton", HLORA_STRATEGY=HLORA_STRATEGY[provider])
    return dict(HLORA_BACKEND=None, HLORA_STRATEGY=None)


def _fused_linear():
    """The kernels' Triton module (importing it defines the kernels: after TRITON_INTERPRET is settled)."""
    return importlib.import_module("hlora.kernels.fused_linear")


def kernel_strategies():
    """The strategies the kernels offer (``fused_linear.STRATEGIES``), or None if they have no switch."""
    found = getattr(_fused_linear(), "STRATEGIES", None)
    return tuple(found) if found else None


@contextlib.contextmanager
def strategy_report():
    """Yields a dict that, after the block, says which strategy the kernels ran: ``HLORA_STRATEGY``
    as ``fused_linear.strategy()`` reads it, and under ``auto`` each product's choice ("y", "dx")
    as ``tuning.choose`` returned it (on CUDA; the interpreter takes ``fused`` without choosing)."""
    tuning = importlib.import_module("hlora.kernels.tuning")
    choose, report = tuning.choose, {}

    def recording_choose(what, *args, **kwargs):
        choice = choose(what, *args, **kwargs)
        if what.startswith("strategy-"):
            report[what[len("strategy-"):]] = choice
        return choice

    tuning.choose = recording_choose
    try:
        yield report
    finally:
        tuning.choose = choose
        report["requested"] = _fused_linear().strategy()


def describe_strategy(report: dict) -> str:
    """"fused", "cublas", or "auto: y=..., dx=..." ("auto: fused" in the interpreter)."""
    if report["requested"] != "auto":
        return report["requested"]
    chosen = ", ".join(f"{k}={v}" for k, v in sorted(report.items()) if k != "requested")
    return f"auto: {chosen or 'fused (no choice timed off CUDA)'}"


# ----------------------------------------------------------------------------------------------
# timing and checking
# ----------------------------------------------------------------------------------------------


def timed(fn, smoke: bool = False):
    """(median, p20, p80) ms: do_bench on a GPU; one wall-clock run in smoke mode (meaningless)."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, ms
    import triton

    return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|; inf if got holds NaN or inf."""
    got = got.double().reshape(want.shape)
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def run_provider(provider: str, c: Case, smoke: bool) -> dict:
    """Build, check against float64, time fwd+bwd: the row's measured fields."""
    with env(**provider_env(provider)):
        if provider == "hlora_cublas" and "cublas" not in (kernel_strategies() or ()):
            raise Skip("this hlora.kernels has no cuBLAS-base strategy (no fused_linear.STRATEGIES)")
        fwd, params, formula = BUILDERS[provider](c, smoke)
        x = c.x.clone().requires_grad_()
        inputs = [x] + list(params)

        def step():
            y = fwd(x)
            return y, torch.autograd.grad(y, inputs, c.dy)

        t0 = time.perf_counter()
        with strategy_report() as report:
            y, grads = step()  # also the warm-up: tuning / compiling happen here, outside do_bench
        first_ms = (time.perf_counter() - t0) * 1e3
        strategy = describe_strategy(report) if provider in HLORA_STRATEGY else None
        y_ref, dx_ref = c.reference(formula)
        err_y, err_dx = rel_err(y.detach(), y_ref), rel_err(grads[0], dx_ref)
        tol = TOL[c.dtype]
        status = "ok" if err_y <= tol and err_dx <= 2 * tol else f"FAILED: error above {tol:g} (y) / {2 * tol:g} (dx)"
        del y, grads
        if smoke:  # one interpreted call is slow enough: its wall time stands in (meaningless anyway)
            ms = p20 = p80 = first_ms
        else:
            torch.cuda.synchronize()
            ms, p20, p80 = timed(step)
    return dict(ms=ms, p20_ms=p20, p80_ms=p80, status=status, err_y=err_y, err_dx=err_dx, strategy=strategy)


def triton_gemm(a, b):
    """a @ b^T through the kernels' GEMM, in a's dtype."""
    out = torch.empty(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    try:
        _fused_linear().gemm("base_gemm", out, a, b, tokens=a.shape[0], dot_dtype=a.dtype)
    except TypeError as e:  # the signature changed under us: say so rather than time something else
        raise Skip(f"hlora.kernels.fused_linear.gemm has a new signature ({e})") from None
    return out


def run_gemm(provider: str, op: str, c: Case, smoke: bool) -> dict:
    a = c.x.reshape(c.T, c.D) if op == "y" else c.dy.reshape(c.T, c.N)
    b = c.W if op == "y" else c.W.t()
    fn = (lambda: triton_gemm(a, b)) if provider == "triton_gemm" else (lambda: F.linear(a, b))
    want = a.double() @ b.double().t()
    err = rel_err(fn(), want)
    tol = TOL[c.dtype]
    ms, p20, p80 = timed(fn, smoke)
    status = "ok" if err <= tol else f"FAILED: error above {tol:g}"
    return dict(ms=ms, p20_ms=p20, p80_ms=p80, status=status, err_y=err, err_dx=None, strategy=None)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def settings(smoke: bool) -> dict:
    if smoke:  # odd sizes, 2 samples of 5 tokens, float32 on the CPU; the fewest cases that reach every code path
        return dict(T=10, dtype=torch.float32, device="cpu", projections={"qkv_proj": (24, 40)},
                    comp=(16, 4), gen=(32, 4), singles=("comp",), sweep_rank=32, ks=(2, 32))
    return dict(T=8192, dtype=torch.bfloat16, device="cuda", projections=dict(PROJECTIONS),
                comp=(COMP.rank, COMP.experts), gen=(GEN.rank, GEN.experts), singles=("comp", "gen"),
                sweep_rank=COMP.rank, ks=KS)


def schedule(cfg: dict):
    """(section, proj, plugins, mix, providers) in priority order, so that a short budget cuts the
    least telling rows: every projection's GEMMs, single-plugin and 50/50 rows first, then the k sweep
    and torch.compile on o_proj (the projection where the adapter weighs most), then the rest."""
    comp, gen = cfg["comp"], cfg["gen"]
    singles = [((cfg[name],), name) for name in cfg["singles"]]
    kernels = ("hlora_fused", "hlora_cublas", "hlora_auto")
    projections = list(cfg["projections"])
    lead = "o_proj" if "o_proj" in projections else projections[0]
    others = [p for p in projections if p != lead]
    for proj in projections:
        yield "gemm", proj, (), "gemm", GEMM_PROVIDERS
    for proj in projections:
        yield "base", proj, (), "base", ("base",)
        for plugins, mix in singles:
            yield "main", proj, plugins, mix, ("peft_lora", "moelora_loop") + kernels
    for proj in projections:
        yield "mixed", proj, (comp, gen), "comp+gen 50/50", ("moelora_loop",) + kernels
    for group in ([lead], others):
        for proj in group:
            for k in cfg["ks"]:
                yield "sweep", proj, ((cfg["sweep_rank"], k),), "sweep", ("moelora_loop",) + kernels
        for proj in group:
            for plugins, mix in singles + [((comp, gen), "comp+gen 50/50")]:
                yield "compile", proj, plugins, mix, ("torch_compile",)


def run(smoke: bool, budget_s: float, log=print) -> dict:
    cfg = settings(smoke)
    t_start = time.time()
    rows, base_ms, cublas_ms = [], {}, {}
    for section, proj, plugins, mix, providers in schedule(cfg):
        D, N = cfg["projections"][proj]
        c = Case(proj, D, N, cfg["T"], plugins, mix, cfg["dtype"], cfg["device"])
        ops = ("y", "dx") if section == "gemm" else (None,)
        for op in ops:
            for provider in providers:
                row = dict(proj=proj, R=c.R, k=c.k, mix=f"gemm {op}" if op else mix, provider=provider,
                           ms=None, ratio_to_base=None, p20_ms=None, p80_ms=None, status="",
                           err_y=None, err_dx=None, strategy=None)
                # a max-autotune compile alone can take a minute: start one only with that much left
                if time.time() - t_start > budget_s - (90 if provider == "torch_compile" and not smoke else 0):
                    row["status"] = f"skipped: time budget of {budget_s:.0f}s spent"
                else:
                    try:
                        row.update(run_gemm(provider, op, c, smoke) if op else run_provider(provider, c, smoke))
                    except Skip as e:
                        row["status"] = f"skipped: {e}"
                    except Exception as e:  # one broken provider must not cost the run the others' rows
                        row["status"] = f"FAILED: {type(e).__name__}: {str(e)[:300]}"
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                if row["ms"] is not None:
                    if op:
                        if provider == "cublas_gemm":
                            cublas_ms[(proj, op)] = row["ms"]
                        ref = cublas_ms.get((proj, op))
                    else:
                        if provider == "base":
                            base_ms[proj] = row["ms"]
                        ref = base_ms.get(proj)
                    row["ratio_to_base"] = row["ms"] / ref if ref else None
                rows.append(row)
                log(f"{proj:13s} {row['mix']:15s} R={row['R']:<4d} k={row['k']:<3d} {provider:14s} "
                    + (f"{row['ms']:9.3f} ms" if row["ms"] is not None else " " * 12) + f"  {row['status']}")
        # GEMM rows: triton before cublas in the schedule; fill the triton ratio now
        for row in rows:
            if row["provider"] == "triton_gemm" and row["ms"] is not None and row["ratio_to_base"] is None:
                ref = cublas_ms.get((row["proj"], row["mix"].split()[1]))
                row["ratio_to_base"] = row["ms"] / ref if ref else None
        del c
    import triton

    device = torch.cuda.get_device_name(0) if (torch.cuda.is_available() and not smoke) else "cpu (smoke)"
    return dict(device=device, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                smoke=smoke, hlora=getattr(hlora, "__version__", "?"), strategies=kernel_strategies(),
                T=cfg["T"], dtype=str(cfg["dtype"]).split(".")[-1], rows=rows)


def default_name(result: dict) -> str:
    """<date>-<gpu>.json, e.g. 2026-12-02-nvidia-h200.json."""
    gpu = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    return f"{result['date'][:10]}-{gpu}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON file (default: OUT_DIR/<date>-<gpu>.json)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the default file name")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU (kernels in the Triton interpreter)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="rows after this many seconds are skipped")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU; on a CPU run it with --smoke", file=sys.stderr)
        return 2
    result = run(args.smoke, args.budget_s)
    out = args.out or os.path.join(args.out_dir, default_name(result))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    failed = [r for r in result["rows"] if r["status"].startswith("FAILED")]
    print(f"wrote {out}: {len(result['rows'])} rows, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
