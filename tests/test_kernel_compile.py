"""Compile gate: every Triton kernel, at every tile the tuner may choose for the HealthGPT-M3
projections (qkv 3072->9216, o 3072->3072, gate_up 3072->16384, down 8192->3072; R=64 and R=256
with k=4, 64+256 stacked and grouped, k=32; a training batch and a decode step; both strategies, with and
without dropout), compiled ahead of time on the CPU for sm_90a (H100/H200) and sm_80 (A100). The
gate epilogues (``ul_gate``, ``dh_db_gate``) are compiled at every tile they may run at: R=64's
64 + k columns in one tile and R=256's rank tiles with recomputed logits (k=4 and k=32), alone
and as the plugins of a grouped 64+256 batch, with the small launches that finish a wide plugin's
router gradient (``gate_logits``) and cast the weight gradients (``cast_grads``).

The launches are the launchers' own (``hlora.kernels.compile_gate.plan`` records them on meta
tensors); the compile runs in a subprocess without ``TRITON_INTERPRET`` (other kernel tests set it
in this process). Selected alone with ``pytest -m compile``; about a minute with a warm Triton
cache (``TRITON_CACHE_DIR``), several minutes cold.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.compile

SCRIPT = """
import dataclasses, json, sys
from hlora.kernels import compile_gate as cg
results = cg.compile_all(cg.m3_launches())
json.dump({"results": [dataclasses.asdict(r) for r in results], "smem_limit": cg.SMEM_LIMIT}, sys.stdout)
"""
ROLES = {"ul", "ul_gate", "gate_fwd", "y_fused", "y_adapter", "dh_db", "dh_db_gate", "gate_logits", "gate_bwd",
         "dx_fused", "dx_adapter", "dar", "cast_grads"}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=3000)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    limits = {int(arch): limit for arch, limit in report["smem_limit"].items()}
    return [dict(r, smem_limit=limits[r["arch"]]) for r in report["results"]]


def test_every_kernel_and_role_is_compiled_for_both_archs(compiled):
    roles = {(role, r["arch"]) for r in compiled for role in r["roles"]}
    assert roles == {(role, arch) for role in ROLES for arch in (90, 80)}
    # the training shapes offer the tuner several tiles per GEMM role
    tiles = {role: {r["tile"] for r in compiled if role in r["roles"] and r["arch"] == 90} for role in ROLES}
    assert all(len(tiles[role]) >= 3 for role in ROLES - {"gate_fwd", "gate_bwd", "gate_logits", "dar", "ul_gate",
                                                          "cast_grads"}), tiles
    # the gate in the UL GEMM's epilogue: a decode step's tile and a training batch's (one plugin's
    # R + k columns in one tile, 8 warps; a wider plugin's rank tiles also at 64 rows)
    assert tiles["ul_gate"] == {"BLOCK_K32-BLOCK_M16-BLOCK_N128-GROUP_M8-num_stages2-num_warps4",
                                "BLOCK_K64-BLOCK_M128-BLOCK_N128-GROUP_M8-num_stages4-num_warps8",
                                "BLOCK_K64-BLOCK_M64-BLOCK_N128-GROUP_M8-num_stages4-num_warps8"}, tiles["ul_gate"]


def test_no_spills_and_shared_memory_within_the_arch_limit(compiled):
    spilling = [(r["kernel"], r["roles"], r["tile"], r["arch"], r["spill_bytes"]) for r in compiled if r["spill_bytes"]]
    assert not spilling, spilling
    over = [(r["kernel"], r["tile"], r["arch"], r["shared"]) for r in compiled if r["shared"] > r["smem_limit"]]
    assert not over, over
    assert all(0 < r["registers"] <= 255 for r in compiled)


def test_hopper_tiles_of_64_rows_use_wgmma(compiled):
    big = [r for r in compiled if r["arch"] == 90 and r["mma_rows"] >= 64]
    assert len(big) > 20
    assert not [(r["kernel"], r["tile"]) for r in big if not r["wgmma"]]
    assert not [r for r in compiled if r["arch"] == 80 and r["wgmma"]]  # no wgmma before Hopper
