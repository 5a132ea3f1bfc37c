"""Compile every launch of the kernels' launch plan ahead of time, on a CPU, and report what ptxas says.

``plan(...)`` runs the real launchers (``fused_linear.hlora_forward`` / ``hlora_backward``) on meta
tensors inside ``record_launches()``, so what is compiled is exactly what would be launched, with
every tile the tuner may choose. ``compile_launch`` specialises the arguments as Triton's launcher
does (ints equal to 1 become constexpr; ints divisible by 16 and 16-byte aligned pointers get
``tt.divisibility=16``), compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))`` and runs the ptxas Triton itself uses for that arch
(``triton.backends.nvidia.compiler.get_ptxas``) with ``-v`` on the PTX for registers and spills;
ptxas reports are cached beside Triton's cache, so a warm run only looks them up.

``python -m hlora.kernels.compile_gate`` prints the table (Markdown) for the M3 projections.
Run it (and import this module) without ``TRITON_INTERPRET``: the tile lists differ under the
interpreter.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import native_specialize_impl

from . import fused_linear

# Phi-3-mini (HealthGPT-M3) projections: name -> (d_in, d_out)
M3_PROJECTIONS = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}
# adapters: name -> (ranks, experts), one plugin unless stacked
M3_ADAPTERS = {
    "R64k4": ((64,), (4,)),
    "R256k4": ((256,), (4,)),
    "stacked64+256": ((64, 256), (4, 4)),  # two plugins: stacked (masked) and grouped
    "R64k32": ((64,), (32,)),
    "R256k32": ((256,), (32,)),
}
TOKENS = (8192, 1)  # a training batch, and a decode step (the fixed small tiles)
ARCHS = {90: "sm_90a", 80: "sm_80"}
SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use: H100/H200, A100


@dataclasses.dataclass(frozen=True)
class Compiled:
    kernel: str
    roles: tuple
    tile: str
    arch: int
    registers: int
    spill_bytes: int  # spill stores + spill loads
    shared: int
    wgmma: bool
    mma_rows: int  # rows of the kernel's output block (BLOCK_M / BLOCK_T); 0 for kernels without dots


def plan(T, d_in, d_out, ranks, experts, strategy, dropout, dtype=torch.bfloat16, param_dtype=torch.bfloat16,
         grouped=False):
    """The launches of one layer's forward and backward (both gradients) under ``strategy``.
    ``grouped``: several plugins as a mixed batch grouped by plugin (``grouped_forward`` /
    ``grouped_backward``), the tokens shared evenly; otherwise stacked (with a routing tensor)."""
    R, K = sum(ranks), sum(experts)
    meta = dict(device="meta")
    x = torch.empty(T, d_in, dtype=dtype, **meta)
    weight = torch.empty(d_out, d_in, dtype=dtype, **meta)
    bias = None
    A = torch.empty(R, d_in, dtype=param_dtype, **meta)
    B = torch.empty(d_out, R, dtype=param_dtype, **meta)
    router = torch.empty(K, d_in, dtype=param_dtype, **meta)
    tp = torch.empty(T, dtype=torch.int32, **meta) if len(ranks) > 1 else None
    dropouts = (dropout,) * len(ranks)
    scales = (2.0,) * len(ranks)
    previous = os.environ.get("HLORA_STRATEGY")
    os.environ["HLORA_STRATEGY"] = strategy
    try:
        if grouped:
            return _grouped_plan(x, weight, dtype, T, ranks, experts, scales, dropouts, param_dtype)
        with fused_linear.record_launches() as launches:
            _, ul, h = fused_linear.hlora_forward(x, weight, bias, None, A, B, router, tp, ranks, experts, scales,
                                                  dropouts, 1234)
            dy = torch.empty(T, d_out, dtype=dtype, **meta)
            fused_linear.hlora_backward(dy, x, weight, A, B, router, tp, ul, h, ranks, experts, scales, dropouts,
                                        1234)
    finally:
        if previous is None:
            os.environ.pop("HLORA_STRATEGY", None)
        else:
            os.environ["HLORA_STRATEGY"] = previous
    return launches


def _grouped_plan(x, weight, dtype, T, ranks, experts, scales, dropouts, param_dtype):
    P, (d_out, d_in) = len(ranks), weight.shape
    meta = dict(device="meta", dtype=param_dtype)
    As = [torch.empty(r, d_in, **meta) for r in ranks]
    Bs = [torch.empty(d_out, r, **meta) for r in ranks]
    routers = [torch.empty(k, d_in, **meta) for k in experts]
    counts = tuple(T // P + (1 if p < T % P else 0) for p in range(P))
    order = torch.empty(T, dtype=torch.int32, device="meta")
    args = (ranks, experts, scales, dropouts, 1234)
    with fused_linear.record_launches() as launches:
        _, ul, h = fused_linear.grouped_forward(x, weight, None, None, As, Bs, routers, order, counts, *args)
        dy = torch.empty(T, d_out, dtype=dtype, device="meta")
        fused_linear.grouped_backward(dy, x, weight, As, Bs, routers, order, counts, ul, h, *args)
    return launches


class _Pointer:
    """What Triton's specialiser needs of a tensor: its dtype and an address (aligned as the real
    allocation plus the view's offset would be)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


def specialise(launch, tile, backend):
    """(signature, constexprs, attrs) as ``JITFunction._pack_args`` builds them for this launch."""
    kernel = launch.kernel
    meta = {k: v for k, v in tile.items() if k not in ("num_warps", "num_stages")}
    values = {**launch.args, **launch.consts, **meta}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        arg = _Pointer(v) if isinstance(v, torch.Tensor) else v
        ty, attr = native_specialize_impl(BaseBackend, arg, False, not p.do_not_specialize, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def _cache_dir() -> pathlib.Path:
    from triton import knobs

    return pathlib.Path(knobs.cache.dir) / "hlora-ptxas"


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` as Triton runs it for ``arch`` (cached by PTX digest)."""
    tool = get_ptxas(arch)
    digest = hashlib.sha256(f"{tool.path}|{arch}|{ptx}".encode()).hexdigest()
    cached = _cache_dir() / f"{digest}.json"
    if cached.exists():
        regs, spills = json.loads(cached.read_text())
        return regs, spills
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [tool.path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
             str(src), "-o", str(src.with_suffix(".o"))],
            capture_output=True, text=True, check=True,
        )
    log = out.stdout + out.stderr
    regs = max(int(m) for m in re.findall(r"Used (\d+) registers", log))
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps([regs, spills]))
    return regs, spills


def _mma_rows(launch, tile) -> int:
    if launch.kernel is fused_linear._gemm_kernel:
        return tile["BLOCK_M"]
    if launch.kernel is fused_linear._dh_db_kernel:
        return min(tile["BLOCK_T"], tile["BLOCK_N"])  # dy @ B has BLOCK_T rows, dy^T @ h BLOCK_N
    return 0


def unique_compiles(launches, archs=ARCHS):
    """{compile key: (launch, tile, arch, roles)} over every tile of every launch, without duplicates."""
    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    jobs: dict = {}
    for launch in launches:
        for tile in launch.tiles:
            for arch in archs:
                sig, consts, attrs = specialise(launch, tile, backends[arch])
                key = (launch.kernel.__name__, arch, tuple(sig.items()), repr(sorted(consts.items())),
                       repr(sorted(attrs.items())), tile["num_warps"], tile["num_stages"])
                if key not in jobs:
                    jobs[key] = [launch, tile, arch, (sig, consts, attrs), set()]
                jobs[key][4].add(launch.role)
    return jobs


def compile_one(launch, tile, arch, spec, roles) -> Compiled:
    sig, consts, attrs = spec
    src = ASTSource(launch.kernel, sig, consts, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]})
    ptx = k.asm["ptx"]
    regs, spills = ptxas_report(ptx, arch)
    return Compiled(launch.kernel.__name__, tuple(sorted(roles)), fused_linear.tile_name(tile), arch, regs, spills,
                    int(k.metadata.shared), "wgmma.mma_async" in ptx, _mma_rows(launch, tile))


def m3_launches():
    launches = []
    for d_in, d_out in M3_PROJECTIONS.values():
        for ranks, experts in M3_ADAPTERS.values():
            for T in TOKENS:
                for strategy in ("fused", "cublas"):
                    for dropout in (0.0, 0.1):
                        for grouped in (False, True) if len(ranks) > 1 else (False,):
                            launches += plan(T, d_in, d_out, ranks, experts, strategy, dropout, grouped=grouped)
    return launches


_JOBS: list = []  # the jobs of the running compile_all, inherited by its forked workers


def _compile_job(i: int) -> Compiled:
    return compile_one(*_JOBS[i])


def compile_all(launches, archs=ARCHS, workers=2):
    """Compile every unique (kernel, specialisation, tile, arch) of ``launches``: a list of ``Compiled``.
    Triton's compiler holds the GIL, so the work is spread over forked processes."""
    global _JOBS
    _JOBS = list(unique_compiles(launches, archs).values())
    try:
        if workers <= 1:
            return [_compile_job(i) for i in range(len(_JOBS))]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_compile_job, range(len(_JOBS)), chunksize=1)
    finally:
        _JOBS = []


def table(results) -> str:
    """Markdown: one row per (kernel, tile, arch), the worst case over its specialisations and roles."""
    rows: dict = {}
    for r in results:
        key = (r.kernel, r.tile, r.arch)
        roles, regs, spills, shared, wgmma, n = rows.get(key, (set(), 0, 0, 0, True, 0))
        rows[key] = (roles | set(r.roles), max(regs, r.registers), max(spills, r.spill_bytes), max(shared, r.shared),
                     wgmma and r.wgmma, n + 1)
    lines = ["| kernel | tile | arch | roles | variants | registers | spill bytes | shared KB | wgmma |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (kernel, tile, arch), (roles, regs, spills, shared, wgmma, n) in sorted(rows.items()):
        lines.append(f"| {kernel} | {tile.replace('num_', '')} | sm_{arch}{'a' if arch == 90 else ''} | "
                     f"{', '.join(sorted(roles))} | {n} | {regs} | {spills} | {shared / 1024:.0f} | "
                     f"{'yes' if wgmma else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = compile_all(m3_launches())
    print(table(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
