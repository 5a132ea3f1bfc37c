#!/usr/bin/env bash
# GPU check of the fused H-LoRA kernels, one command: bash benchmarks/gpu_check.sh
# 1. tests/test_kernels.py with compiled kernels (no interpreter; bf16, fp16 and fp32, torch.compile)
# 2. benchmarks/bench_kernels.py: correctness at training shapes, timings, memory
# Output goes to $OUT (or ./gpu_check_out): pytest.log, bench.log, bench.csv, correctness.csv, bench.md.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
unset TRITON_INTERPRET
export HLORA_BACKEND=triton
python -c "import hlora.kernels" 2>/dev/null || pip install -e . --no-deps -q

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
python -m pytest tests/test_kernels.py -q -p no:cacheprovider 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
unset HLORA_BACKEND  # the benchmark picks the backend per provider
python benchmarks/bench_kernels.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: pytest exit $tests, bench exit $bench (results in $out)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
