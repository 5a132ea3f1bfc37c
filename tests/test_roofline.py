"""benchmarks/roofline.py's counting against hand-derived cases (FLOPs, bytes, launch lists; no timings)."""

import csv
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("roofline", os.path.join(ROOT, "benchmarks", "roofline.py"))
rl = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("roofline", rl)  # dataclasses look their module up while the file executes
_spec.loader.exec_module(rl)

# odd sizes, so that no two products coincide by accident
T, D, N = 1000, 300, 700
DEV = rl.Device("test", flops_per_s=1e12, bytes_per_s=1e9, note="")


def _gemm_flops(launches):
    return sorted(l.flops for l in launches if l.flops > 0)


def test_single_gemm_counts_2mnk_flops_and_each_operand_once():
    g = rl.gemm("g", 37, 53, 71)
    assert g.flops == 2 * 37 * 53 * 71
    assert g.bytes == 2 * (37 * 71 + 71 * 53 + 37 * 53)  # bf16 A, B, C
    acc = rl.gemm("g", 37, 53, (71, 4, 2), c=4, c_in=4)  # fp32 A and fp32 C read and written
    assert acc.bytes == 37 * 71 * 4 + 71 * 53 * 2 + 37 * 53 * 8
    two = rl.gemm("g", 37, 53, 71, 9)  # extended K: [A1, A2] @ [B1; B2]
    assert two.flops == 2 * 37 * 53 * 80
    assert two.bytes == 2 * (37 * 80 + 80 * 53 + 37 * 53)


def test_launch_time_is_the_larger_of_compute_and_memory():
    compute_bound = rl.Launch("c", flops=4e12, bytes=1e9)  # 4 s of FLOPs, 1 s of bytes
    memory_bound = rl.Launch("m", flops=1e12, bytes=3e9)
    assert compute_bound.seconds(DEV) == pytest.approx(4.0)
    assert memory_bound.seconds(DEV) == pytest.approx(3.0)
    assert rl.plan_us([compute_bound, memory_bound], DEV, launch_us=5.0) == pytest.approx(7e6 + 10.0)


@pytest.mark.parametrize("launch_us", [0.0, 1.0, 7.5])
def test_base_plan_is_two_gemms_and_its_own_ratio_is_one(launch_us):
    p = rl.Problem(T, D, N, (rl.Plugin(16, 4),))
    base = rl.base_plan(p)
    assert _gemm_flops(base) == [2 * T * D * N] * 2
    one = max(2 * T * D * N / DEV.flops_per_s, 2 * (T * D + D * N + T * N) / DEV.bytes_per_s) * 1e6
    assert rl.plan_us(base, DEV, launch_us) == pytest.approx(2 * one + 2 * launch_us)
    assert rl.ratio_to_base(rl.base_plan, p, DEV, launch_us) == pytest.approx(1.0)


def test_peft_plan_holds_the_lora_gemms_and_three_full_width_elementwise_passes():
    R = 24
    plan = rl.peft_lora_plan(rl.Problem(T, D, N, (rl.Plugin(R, 4),)))
    want = sorted([2 * T * N * D, 2 * T * R * D, 2 * T * N * R,  # forward: base, x A^T, (.) B^T
                   2 * T * R * N, 2 * N * R * T, 2 * T * D * R, 2 * R * D * T, 2 * T * D * N])  # backward
    assert _gemm_flops(plan) == want
    elementwise = [l for l in plan if l.flops == 0]
    # * scaling (fwd, bwd): read + write [T, N]; result + ...: two reads, one write; dx accumulation
    assert sorted(l.bytes for l in elementwise) == sorted([4 * T * N, 4 * T * N, 6 * T * N, 6 * T * D])


def test_fused_e83936e_does_exactly_the_six_products_and_splits_as_the_heuristic_did():
    R, K = 64, 4
    p = rl.Problem(8192, 3072, 3072, (rl.Plugin(R, K),))
    T_, D_, N_ = p.T, p.d_in, p.d_out
    plan = rl.fused_e83936e_plan(p)
    total = sum(l.flops for l in plan)
    assert total == 2 * T_ * (D_ * (R + K) + N_ * (D_ + R) + R * N_ + D_ * (N_ + R + K) + N_ * R + (R + K) * D_)
    # o_proj dB: 24 output tiles, 2 * 132 // 24 = 11 splits, slices of 768 tokens: 11 fp32 partials
    assert rl._split_e83936e(N_, R, T_) == 11
    dB = next(l for l in plan if l.name.startswith("bwd dB"))
    assert "split 11" in dB.name and dB.bytes == 2 * (N_ * T_ + T_ * R) + 11 * N_ * R * 4
    assert rl._split_e83936e(T_, R + K, D_) == 4  # UL: 64 tiles -> 4 splits
    assert len(plan) == 17  # kernels-review.md: 17 launches per projection


@pytest.mark.parametrize("plan", [rl.fused_plan, rl.cublas_plan, rl.cublas_d3d13cb_plan, rl.fused_e83936e_plan,
                                  rl.fused_epilogue_plan])
def test_hlora_plans_do_at_least_the_flop_floor(plan):
    p = rl.Problem(T, D, N, (rl.Plugin(40, 4),))
    floor = rl.flop_floor(p) * 2 * (2 * T * D * N)
    assert sum(l.flops for l in plan(p)) >= floor * (1 - 1e-12)


def test_break_even_efficiency_is_one_against_itself_and_lower_against_a_slower_plan():
    p = rl.Problem(T, D, N, (rl.Plugin(40, 4),))
    assert rl.break_even_efficiency(p, rl.fused_plan, DEV, 0.0) == pytest.approx(1.0)
    assert rl.break_even_efficiency(p, rl.peft_lora_plan, DEV, 0.0) < 1.0


def test_grouped_mixed_batch_does_the_mean_of_the_single_plugin_work_and_masked_does_more():
    a, b = rl.Plugin(16, 2), rl.Plugin(48, 4)
    mixed = rl.Problem(T, D, N, (rl.Plugin(16, 2, 0.5), rl.Plugin(48, 4, 0.5)))
    flops = {name: sum(l.flops for l in plan) for name, plan in [
        ("a", rl.fused_plan(rl.Problem(T, D, N, (a,)))), ("b", rl.fused_plan(rl.Problem(T, D, N, (b,)))),
        ("grouped", rl.fused_grouped_plan(mixed)), ("masked", rl.fused_plan(mixed))]}
    assert flops["grouped"] == pytest.approx((flops["a"] + flops["b"]) / 2)
    # masked: all 16 + 48 rank columns (+ 6 logits, padded to 80) for every token
    assert flops["masked"] - flops["grouped"] > 0.4 * (flops["b"] - flops["a"])


@pytest.mark.parametrize("k", [2, 8])
def test_moelora_loop_has_six_gemms_per_expert(k):
    plan = rl.moelora_loop_plan(rl.Problem(T, D, N, (rl.Plugin(8 * k, k),)))
    gemms = [l for l in plan if l.flops > 0]
    assert len(gemms) == 6 * k + 5  # base, router and its two grads, dx_base; per expert 2 fwd + 4 bwd
    assert sum(1 for l in plan if l.name.endswith(f"e{k - 1}: y + (.)")) == 1


def test_cli_writes_liger_rows_with_bounds(tmp_path):
    assert rl.main(["--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "roofline.csv")))
    assert set(rows[0]) == {"kernel", "provider", "mode", "x", "median", "p20", "p80", "gpu", "version"}
    providers = {r["provider"] for r in rows}
    assert providers == set(rl.PLANS)
    base = {(r["gpu"], r["kernel"]): float(r["median"]) for r in rows if r["provider"] == "base"}
    assert len(base) == len(rl.DEVICES) * len(rl.PROJECTIONS)
    for r in rows:  # no plan beats the frozen base of its projection and device
        proj = r["kernel"].split()[1]
        assert float(r["median"]) > base[(r["gpu"], f"roofline {proj}")] or r["provider"] == "base"
    assert "| o_proj | 64 |" in (tmp_path / "roofline.md").read_text()


@pytest.mark.parametrize("strategy, plan, grouped", [
    ("fused", rl.fused_plan, False), ("cublas", rl.cublas_plan, False),
    ("fused", rl.fused_grouped_plan, True), ("cublas", rl.cublas_grouped_plan, True)])
@pytest.mark.parametrize("ranks, experts", [((64,), (4,)), ((256,), (4,)), ((64, 256), (4, 4))])
def test_built_plans_list_the_triton_launches_the_launchers_make(strategy, plan, grouped, ranks, experts):
    """The as-built plans against what kernels/fused_linear.py's launchers record for one layer:
    stacked (masked) and grouped mixed batches, the tokens split evenly."""
    from hlora.kernels import compile_gate  # the kernels' own plan recorder (meta tensors, nothing runs)

    launches = compile_gate.plan(512, 96, 80, ranks, experts, strategy, 0.0, grouped=grouped and len(ranks) > 1)
    p = rl.Problem(512, 96, 80, tuple(rl.Plugin(r, k, 1 / len(ranks)) for r, k in zip(ranks, experts)))
    assert [l.role for l in plan(p) if l.role] == [l.role for l in launches]
    if grouped and len(ranks) > 1:  # each plugin's rank GEMMs on its own 256 tokens
        assert [l.args["M"] for l in launches if l.role in ("ul", "ul_gate")] == [256, 256]
        assert [l.args["K1"] for l in launches if l.role == "dar"] == [256, 256]
