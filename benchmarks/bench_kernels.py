#!/usr/bin/env python
"""GPU check and benchmark of the fused H-LoRA kernels: ``python benchmarks/bench_kernels.py --out DIR``.

1. Correctness on the card against a float64 reference (bf16, fp16, fp32; decode-sized, odd and
   training-sized shapes; mixed two-plugin routing with unrouted tokens; dropout reproducibility).
2. fwd+bwd (and fwd) timings with ``triton.testing.do_bench`` at T=8192 tokens on HealthGPT-M3
   (Phi-3-mini) projections, bf16, for the comprehension (R=64, k=4, alpha 128) and generation
   (R=256, k=4, alpha 512) plugins. Providers: the frozen base linear (dX only), PEFT's LoRA of the
   same total rank, a MoE-LoRA loop over experts, H-LoRA's torch path and the fused kernels.
3. Expert sweep on o_proj at r=16 per expert (k = 2, 4, 8, 32); a 50/50 two-plugin batch against
   single-plugin batches; activation memory each provider saves for its backward.

Writes DIR/bench.csv (kernel, provider, mode, x, median_ms, p20_ms, p80_ms, gpu, version),
DIR/correctness.csv and DIR/bench.md (tables with ratios to the base), and prints the markdown.
Exits 1 if a correctness check fails, 2 without CUDA. Needs a GPU: the CPU tests of the same
kernels are ``pytest tests/test_kernels.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F

T_BENCH = 8192
LAYERS = {  # HealthGPT-M3 = Phi-3-mini projections (d_in, d_out)
    "qkv_proj": (3072, 9216),
    "o_proj": (3072, 3072),
    "gate_up_proj": (3072, 16384),
    "down_proj": (8192, 3072),
}
PLUGINS = {  # name: (total rank R, experts k, alpha); scale = alpha / (R / k)
    "comp": (64, 4, 128),
    "gen": (256, 4, 512),
}
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}
DEV = "cuda"


@contextlib.contextmanager
def hlora_backend(name):
    old = os.environ.get("HLORA_BACKEND")
    os.environ["HLORA_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HLORA_BACKEND", None)
        else:
            os.environ["HLORA_BACKEND"] = old


# ----------------------------------------------------------------------------------------------
# 1. correctness against float64
# ----------------------------------------------------------------------------------------------


def reference(x, W, b, A, B, router, ranks, experts, scales, tp):
    """The H-LoRA formula in float64, written out independently of the package."""
    T = x.shape[0]
    y = x @ W.t() + (b if b is not None else 0)
    r0 = k0 = 0
    for q, (R_q, k_q, s_q) in enumerate(zip(ranks, experts, scales)):
        z = x @ router[k0 : k0 + k_q].t()
        z = z - z.max(dim=1, keepdim=True).values.detach()
        g = torch.softmax(torch.where(z < -60, torch.full_like(z, float("-inf")), z), dim=1)
        routed = (tp == q) if tp is not None else torch.full((T,), q == 0, device=x.device)
        g = g * routed[:, None].to(g.dtype)
        u = s_q * (x @ A[r0 : r0 + R_q].t())
        y = y + (u.view(T, k_q, -1) * g[:, :, None]).reshape(T, R_q) @ B[:, r0 : r0 + R_q].t()
        r0, k0 = r0 + R_q, k0 + k_q
    return y


def make_adapter(D, N, ranks, experts, dtype, device, gen, bias=False):
    R, K = sum(ranks), sum(experts)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    return dict(W=rnd(N, D, scale=D**-0.5), b=rnd(N) if bias else None, A=rnd(R, D, scale=D**-0.5),
                B=rnd(N, R, scale=R**-0.5), router=rnd(K, D, scale=2 * D**-0.5))


def check_case(name, T, D, N, ranks, experts, dtype, routed, rows, bias=False):
    from hlora.functional import hlora_linear

    dev = DEV
    gen = torch.Generator(device=dev).manual_seed(0)
    p = make_adapter(D, N, ranks, experts, dtype, dev, gen, bias)
    scales = tuple(2.0 + q for q in range(len(ranks)))
    x = torch.randn(T, D, generator=gen, device=dev).to(dtype)
    tp = torch.randint(-1, len(ranks), (T,), generator=gen, device=dev) if routed else None
    w = torch.randn(T, N, generator=gen, device=dev)

    leaves = {k: v.clone().requires_grad_() for k, v in (("x", x), ("A", p["A"]), ("B", p["B"]), ("router", p["router"]))}
    with hlora_backend("triton"):
        y = hlora_linear(leaves["x"], p["W"], p["b"], leaves["A"], leaves["B"], leaves["router"], ranks, experts, scales, tp)
        (y.float() * w).sum().backward()
        ok_base = True
        if tp is not None:
            with torch.no_grad():
                y_base = hlora_linear(x, p["W"], p["b"], p["A"], p["B"], p["router"], ranks, experts, scales,
                                      torch.full_like(tp, -1))
            ok_base = bool(torch.equal(y[tp == -1], y_base[tp == -1]))
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    y_ref = reference(ref_leaves["x"], p["W"].double(), p["b"].double() if p["b"] is not None else None,
                      ref_leaves["A"], ref_leaves["B"], ref_leaves["router"], ranks, experts, scales, tp)
    (y_ref * w.double()).sum().backward()

    ok_all = ok_base
    for what, got, want in [("y", y.detach(), y_ref.detach())] + [
        (f"d{k}", leaves[k].grad, ref_leaves[k].grad) for k in ("x", "A", "B", "router")
    ]:
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if not torch.isfinite(got).all():
            err = float("inf")
        tol = TOL[dtype] * (1 if what == "y" else 2)
        ok = err <= tol
        ok_all &= ok
        rows.append(dict(case=name, dtype=str(dtype).split(".")[-1], tensor=what, max_rel_err=f"{err:.2e}", tol=tol, ok=ok))
    if tp is not None:
        rows.append(dict(case=name, dtype=str(dtype).split(".")[-1], tensor="unrouted rows == base", max_rel_err="",
                         tol="exact", ok=ok_base))
    return ok_all


def check_dropout(rows):
    from hlora.functional import hlora_linear

    gen = torch.Generator(device=DEV).manual_seed(1)
    p = make_adapter(512, 384, (64,), (4,), torch.bfloat16, DEV, gen)
    x = torch.randn(1024, 512, generator=gen, device=DEV).to(torch.bfloat16)
    args = (x, p["W"], None, p["A"], p["B"], p["router"], (64,), (4,), (8.0,), None)
    with hlora_backend("triton"), torch.no_grad():
        torch.manual_seed(3)
        y1 = hlora_linear(*args, 0.1, True)
        torch.manual_seed(3)
        y2 = hlora_linear(*args, 0.1, True)
        y3 = hlora_linear(*args, 0.1, True)
        y0 = hlora_linear(*args, 0.1, False)
    ok = bool(torch.equal(y1, y2)) and not torch.equal(y1, y3) and not torch.equal(y1, y0)
    rows.append(dict(case="dropout seeded by torch.manual_seed", dtype="bfloat16", tensor="y", max_rel_err="",
                     tol="exact", ok=ok))
    return ok


def correctness():
    rows, ok = [], True
    comp_gen = ((64, 256), (4, 4))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ok &= check_case("decode T=1 3072->9216 comp", 1, 3072, 9216, (64,), (4,), dtype, False, rows)
        ok &= check_case("odd T=333 1000->777 comp+gen mixed, bias", 333, 1000, 777, *comp_gen, dtype, True, rows, bias=True)
    # training-sized: the autotuned tiles
    ok &= check_case("o_proj T=8192 comp+gen mixed", T_BENCH, 3072, 3072, *comp_gen, torch.bfloat16, True, rows)
    ok &= check_case("down_proj T=8192 gen", T_BENCH, 8192, 3072, (256,), (4,), torch.bfloat16, False, rows)
    ok &= check_dropout(rows)
    return rows, ok


# ----------------------------------------------------------------------------------------------
# 2. providers: each returns (forward function of x, trainable tensors besides x, [label])
# ----------------------------------------------------------------------------------------------


def provider_base(W, **_):
    return (lambda x: F.linear(x, W)), []


def provider_peft(W, R, k, alpha, gen, **_):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    N, D = W.shape
    base = torch.nn.Linear(D, N, bias=False, device=W.device, dtype=W.dtype)
    base.weight.data.copy_(W)
    base.weight.requires_grad_(False)
    lora_alpha = alpha / k  # PEFT's scale alpha / R equals H-LoRA's alpha / r for the same total rank
    cfg = LoraConfig(r=R, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=["x"])
    layer = LoraLinear(base, "default", config=cfg, r=R, lora_alpha=lora_alpha, lora_dropout=0.0)
    layer.to(device=W.device, dtype=W.dtype)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, R**-0.5, generator=gen)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def _adapter(W, R, k, gen):
    N, D = W.shape
    dev, dt = W.device, W.dtype
    A = (torch.randn(R, D, generator=gen, device=dev) * D**-0.5).to(dt).requires_grad_()
    B = (torch.randn(N, R, generator=gen, device=dev) * R**-0.5).to(dt).requires_grad_()
    router = (torch.randn(k, D, generator=gen, device=dev) * D**-0.5).to(dt).requires_grad_()
    return A, B, router


def provider_moelora(W, R, k, alpha, gen, **_):
    """MoE-LoRA as public implementations write it: a Python loop over k expert LoRA pairs."""
    A, B, router = _adapter(W, R, k, gen)
    r, s = R // k, alpha / (R // k)
    As, Bs = list(A.detach().split(r)), list(B.detach().split(r, dim=1))
    As = [a.clone().requires_grad_() for a in As]
    Bs = [b.contiguous().requires_grad_() for b in Bs]

    def fwd(x):
        y = F.linear(x, W)
        g = torch.softmax(F.linear(x, router).float(), dim=-1).to(x.dtype)
        for i in range(k):
            y = y + (s * g[:, i : i + 1]) * F.linear(F.linear(x, As[i]), Bs[i])
        return y

    return fwd, As + Bs + [router]


def provider_hlora(W, R, k, alpha, gen, plugins=None, tp=None, **_):
    """hlora.functional.hlora_linear; the backend (torch or triton) is chosen around the timing."""
    from hlora.functional import hlora_linear

    plugins = plugins or [(R, k, alpha)]
    ranks = tuple(p[0] for p in plugins)
    experts = tuple(p[1] for p in plugins)
    scales = tuple(p[2] / (p[0] // p[1]) for p in plugins)
    A, B, router = _adapter(W, sum(ranks), sum(experts), gen)

    def fwd(x):
        return hlora_linear(x, W, None, A, B, router, ranks, experts, scales, tp, 0.0, True)

    return fwd, [A, B, router]


PROVIDERS = {
    "base": (provider_base, None),
    "peft_lora": (provider_peft, None),
    "moelora_loop": (provider_moelora, None),
    "hlora_torch": (provider_hlora, "torch"),
    "hlora_fused": (provider_hlora, "triton"),
}


def time_provider(name, W, x, dy, modes=("fwd+bwd", "fwd"), memory=False, **kw):
    import triton

    make, backend = PROVIDERS[name]
    gen = torch.Generator(device=W.device).manual_seed(0)
    fwd, params = make(W, gen=gen, **kw)
    inputs = [x] + list(params)
    out = {}
    with hlora_backend(backend or "torch"):
        for mode in modes:
            if mode == "fwd":
                def step():
                    with torch.no_grad():
                        fwd(x)
            else:
                def step():
                    torch.autograd.grad(fwd(x), inputs, dy)
            step()  # compile / autotune outside the timing
            torch.cuda.synchronize()
            out[mode] = triton.testing.do_bench(step, warmup=25, rep=150, quantiles=[0.5, 0.2, 0.8])
        if memory:
            torch.cuda.synchronize()
            m0 = torch.cuda.memory_allocated()
            y = fwd(x)
            torch.cuda.synchronize()
            saved = torch.cuda.memory_allocated() - m0 - y.numel() * y.element_size()
            out["saved_MiB"] = saved / 2**20
            del y
    return out


# ----------------------------------------------------------------------------------------------
# 3. the benchmark sections
# ----------------------------------------------------------------------------------------------


def benchmarks(quick, gpu, version, rows, md):
    dev, dt = DEV, torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def record(kernel, provider, mode, x, res):
        if mode == "saved_MiB":
            rows.append(dict(kernel=kernel, provider=provider, mode=mode, x=x, median_ms=f"{res:.2f}", p20_ms="",
                             p80_ms="", gpu=gpu, version=version))
        else:
            rows.append(dict(kernel=kernel, provider=provider, mode=mode, x=x, median_ms=f"{res[0]:.4f}",
                             p20_ms=f"{res[1]:.4f}", p80_ms=f"{res[2]:.4f}", gpu=gpu, version=version))

    layers = {"o_proj": LAYERS["o_proj"]} if quick else LAYERS
    main = {}
    for lname, (D, N) in layers.items():
        W = (torch.randn(N, D, generator=gen, device=dev) * D**-0.5).to(dt)
        x = torch.randn(T_BENCH, D, generator=gen, device=dev).to(dt).requires_grad_()
        dy = torch.randn(T_BENCH, N, generator=gen, device=dev).to(dt)
        for pname, (R, k, alpha) in PLUGINS.items():
            kernel = f"{lname} {D}->{N} {pname} R={R} k={k}"
            for prov in PROVIDERS:
                t0 = time.time()
                res = time_provider(prov, W, x, dy, memory=True, R=R, k=k, alpha=alpha)
                for mode in ("fwd+bwd", "fwd", "saved_MiB"):
                    record(kernel, prov, mode, T_BENCH, res[mode])
                main[(lname, pname, prov)] = res
                print(f"  {kernel:45s} {prov:13s} fwd+bwd {res['fwd+bwd'][0]:.3f} ms  fwd {res['fwd'][0]:.3f} ms"
                      f"  saved {res['saved_MiB']:.1f} MiB  ({time.time() - t0:.1f}s)", flush=True)
        del W, x, dy

    provs = list(PROVIDERS)
    for mode in ("fwd+bwd", "fwd"):
        md.append(f"\n### {mode} at T={T_BENCH}, bf16: base ms and ratios to the base ({gpu})\n")
        md.append("| layer | plugin | base ms | " + " | ".join(provs[1:]) + " |")
        md.append("|---|---|---|" + "---|" * (len(provs) - 1))
        for lname in layers:
            for pname in PLUGINS:
                base = main[(lname, pname, "base")][mode][0]
                ratios = " | ".join(f"{main[(lname, pname, p)][mode][0] / base:.2f}" for p in provs[1:])
                md.append(f"| {lname} | {pname} | {base:.3f} | {ratios} |")
    md.append(f"\n### activation memory saved for backward per layer (MiB, T={T_BENCH}, bf16)\n")
    md.append("| layer | plugin | " + " | ".join(provs) + " |")
    md.append("|---|---|" + "---|" * len(provs))
    for lname in layers:
        for pname in PLUGINS:
            md.append(f"| {lname} | {pname} | " + " | ".join(f"{main[(lname, pname, p)]['saved_MiB']:.1f}" for p in provs) + " |")

    # expert sweep on o_proj, r = 16 per expert
    D, N = LAYERS["o_proj"]
    W = (torch.randn(N, D, generator=gen, device=dev) * D**-0.5).to(dt)
    x = torch.randn(T_BENCH, D, generator=gen, device=dev).to(dt).requires_grad_()
    dy = torch.randn(T_BENCH, N, generator=gen, device=dev).to(dt)
    ks = (2, 4, 8) if quick else (2, 4, 8, 32)
    sweep = {}
    for k in ks:
        R, alpha = 16 * k, 32  # alpha / r = 2
        for prov in PROVIDERS:
            res = time_provider(prov, W, x, dy, modes=("fwd+bwd",), R=R, k=k, alpha=alpha)
            record(f"o_proj sweep r=16 R={R}", prov, "fwd+bwd", k, res["fwd+bwd"])
            sweep[(k, prov)] = res["fwd+bwd"][0]
        print(f"  sweep k={k}: " + ", ".join(f"{p} {sweep[(k, p)]:.3f}" for p in PROVIDERS), flush=True)
    md.append("\n### expert sweep, o_proj, r=16 per expert, fwd+bwd: ratios to PEFT LoRA of the same total rank\n")
    md.append("| k | R | LoRA ms | MoE-LoRA loop | H-LoRA torch | H-LoRA fused | fused / base |")
    md.append("|---|---|---|---|---|---|---|")
    for k in ks:
        lora = sweep[(k, "peft_lora")]
        md.append(f"| {k} | {16 * k} | {lora:.3f} | {sweep[(k, 'moelora_loop')] / lora:.2f} | "
                  f"{sweep[(k, 'hlora_torch')] / lora:.2f} | {sweep[(k, 'hlora_fused')] / lora:.2f} | "
                  f"{sweep[(k, 'hlora_fused')] / sweep[(k, 'base')]:.2f} |")

    # a 50/50 batch of the two plugins against single-plugin batches
    both = [PLUGINS["comp"], PLUGINS["gen"]]
    tp = torch.cat([torch.zeros(T_BENCH // 2), torch.ones(T_BENCH - T_BENCH // 2)]).to(dev, torch.int64)
    mixed = {}
    base_ms = None
    for label, kw in [("base", None), ("comp only", dict(plugins=[both[0]])), ("gen only", dict(plugins=[both[1]])),
                      ("50/50 comp+gen", dict(plugins=both, tp=tp))]:
        for prov in (("base",) if kw is None else ("hlora_torch", "hlora_fused")):
            res = time_provider(prov, W, x, dy, modes=("fwd+bwd",), R=64, k=4, alpha=128, **(kw or {}))
            record(f"o_proj mixed batch: {label}", prov, "fwd+bwd", T_BENCH, res["fwd+bwd"])
            mixed[(label, prov)] = res["fwd+bwd"][0]
            if prov == "base":
                base_ms = res["fwd+bwd"][0]
    md.append(f"\n### o_proj, one batch of {T_BENCH} tokens: two plugins routed 50/50 against one plugin (fwd+bwd)\n")
    md.append("| batch | H-LoRA torch ms (x base) | H-LoRA fused ms (x base) |")
    md.append("|---|---|---|")
    for label in ("comp only", "gen only", "50/50 comp+gen"):
        t, f = mixed[(label, "hlora_torch")], mixed[(label, "hlora_fused")]
        md.append(f"| {label} | {t:.3f} ({t / base_ms:.2f}) | {f:.3f} ({f / base_ms:.2f}) |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder")
    ap.add_argument("--quick", action="store_true", help="o_proj only, k up to 8")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False). "
              "On a CPU run the interpreter tests instead: pytest tests/test_kernels.py", file=sys.stderr)
        return 2
    import triton

    import hlora

    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    version = f"hlora {getattr(hlora, '__version__', '?')} torch {torch.__version__} triton {triton.__version__}"
    md = [f"# H-LoRA fused kernels on {gpu}", "", f"{version}; {time.strftime('%Y-%m-%d %H:%M')}"]
    ok = True
    t0 = time.time()
    if not args.skip_correctness:
        rows, ok = correctness()
        with open(os.path.join(args.out, "correctness.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        md.append(f"\n### correctness against float64 ({'all pass' if ok else 'FAILURES'})\n")
        md.append("| case | dtype | tensor | max err / max abs ref | tol | ok |")
        md.append("|---|---|---|---|---|---|")
        md += [f"| {r['case']} | {r['dtype']} | {r['tensor']} | {r['max_rel_err']} | {r['tol']} | {r['ok']} |" for r in rows]
        print(f"correctness: {'all pass' if ok else 'FAILURES'} ({time.time() - t0:.0f}s)", flush=True)
    if not args.skip_bench:
        rows = []
        benchmarks(args.quick, gpu, version, rows, md)
        with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["kernel", "provider", "mode", "x", "median_ms", "p20_ms", "p80_ms", "gpu", "version"])
            wr.writeheader()
            wr.writerows(rows)
    md.append(f"\n(total {time.time() - t0:.0f}s)")
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
