#!/usr/bin/env bash
# GPU check of the H-LoRA kernels, one command, under 8 minutes on an H100 / H200 (worst case: every
# step at its timeout, 7 min 30 s):
#   bash benchmarks/gpu_check.sh [extra bench_kernels.py arguments]
# 1. the kernel tests with compiled kernels (no interpreter; bf16, fp16, fp32); the compile gate is
#    an ahead-of-time check on the CPU that CI runs already
# 2. issue 13 hook: the quantized (4-bit) base path's GPU tests, once they exist
# 3. benchmarks/bench_kernels.py: Triton GEMM vs F.linear, fwd+bwd of every provider at R=64, R=256,
#    the 50/50 batch and k = 2..32, each checked against float64 first; rows past the time left skip
# 4. benchmarks/generate.py --gpu: the decoding benchmark (eager static step) in the time left;
#    GPU_CHECK_DECODE_COMPILE=1 adds the compiled step (10 more minutes at most)
# The JSON goes to $OUT if set (the folder a device run brings back), else benchmarks/results/;
# logs go to ${OUT:-gpu_check_out}. Exit status: non-zero if any step failed.
set -u
cd "$(dirname "$0")/.."
logs="${OUT:-gpu_check_out}"
mkdir -p "$logs"
start=$SECONDS
unset TRITON_INTERPRET HLORA_BACKEND HLORA_STRATEGY
python -c "import hlora.kernels" 2>/dev/null || pip install -e . --no-deps -q
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$logs/gpu.txt" 2>&1

# ---- 1. compiled kernel tests --------------------------------------------------------------------
timeout 240 python -m pytest tests/test_kernels.py -q -p no:cacheprovider 2>&1 | tee "$logs/pytest.log"
tests=${PIPESTATUS[0]}

# ---- 2. issue 13 hook: quantized (4-bit) base ------------------------------------------------------
# The quantized-base work adds its GPU tests as tests/test_quantized_base*.py (and its rows to
# bench_kernels.py). This section runs them when they exist, and says so when they do not; it comes
# before the benchmark so that the benchmark's budget accounts for it.
quantized=0
shopt -s nullglob
quantized_tests=(tests/test_hlora_quantized.py)  # its layer tests on CUDA: bitsandbytes 4/8-bit + the cublas strategy
if [ ${#quantized_tests[@]} -gt 0 ]; then
    timeout 90 python -m pytest "${quantized_tests[@]}" -k cuda -q -p no:cacheprovider 2>&1 | tee "$logs/quantized.log"
    quantized=${PIPESTATUS[0]}
    timeout 60 python benchmarks/bench_quantized.py --device cuda --hidden 3072 --inter 8192 --seq 2048 --reps 10 \
        --json "$logs/bench_quantized.json" 2>&1 | tee -a "$logs/quantized.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || quantized=1
else
    echo "gpu_check: no quantized-base tests yet (issue 13)" | tee "$logs/quantized.log"
fi

# ---- 3. layer benchmark (budget: what is left of 6 minutes 30, at least 1; a started row finishes) -
budget=$(( 390 - (SECONDS - start) )); [ "$budget" -lt 60 ] && budget=60
python benchmarks/bench_kernels.py --budget-s "$budget" ${OUT:+--out-dir "$OUT"} "$@" 2>&1 | tee "$logs/bench.log"
bench=${PIPESTATUS[0]}

# ---- 4. issue 16: decoding, the static step eager, in what is left of the 8 minutes ------------------
# GPU_CHECK_DECODE_COMPILE=1 adds the compiled step (--compile: three inductor compilations, batch 2,
# 1 and 8; not measured on a GPU yet): up to 10 more minutes, so a device session should run it as a
# call of its own.
left=$(( 470 - (SECONDS - start) ))
decode_flags=""
if [ "${GPU_CHECK_DECODE_COMPILE:-0}" = "1" ]; then
    left=600 decode_flags="--compile"
fi
if [ "$left" -ge 30 ]; then
    timeout "$left" python benchmarks/generate.py --gpu $decode_flags --repeats 1 ${OUT:+--json "$OUT/generate.json"} \
        2>&1 | tee "$logs/generate.log"
else
    echo "gpu_check: no time left for the decoding benchmark (${left}s)" | tee "$logs/generate.log"
fi
echo "gpu_check: pytest exit $tests, bench exit $bench, quantized base exit $quantized, $((SECONDS - start))s (logs in $logs)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$quantized" -eq 0 ]
