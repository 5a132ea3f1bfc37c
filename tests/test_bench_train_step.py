"""The whole-model training benchmark's CPU mode: every provider trains and is reported (no timings)."""

import csv
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_cpu_smoke_reports_every_provider(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--cpu-smoke", "--steps", "1",
                    "--out", str(tmp_path)], check=True, env={**os.environ, "HLORA_BACKEND": "torch"})
    rows = list(csv.DictReader(open(tmp_path / "train_step.csv")))
    names = {r["provider"] for r in rows}
    assert {"peft-lora", "hlora-moelora", "hlora-comp", "hlora-gen", "hlora-mixed", "healthgpt-stage3"} <= names
    assert {f"sweep-{f}-k{k}" for f in ("hlora", "moelora") for k in (2, 4, 8, 32)} <= names
    for r in rows:
        assert set(r) >= {"kernel", "provider", "mode", "x", "median", "p20", "p80", "gpu", "version"}
        assert float(r["tokens_per_s"]) > 0 and math.isfinite(float(r["median"]))
    assert (tmp_path / "k_sweep.png").stat().st_size > 1000
    assert "| hlora-comp | 64 |" in (tmp_path / "train_step.md").read_text()
