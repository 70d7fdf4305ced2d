#!/usr/bin/env bash
# Issue 16, FP8 weights on the GPU machine: `bash benchmarks/scripts/issue16_fp8_run.sh SECTION...` from the repo root
# with .whl and .assets carried (see device_env.sh). Records and logs go to $OUT (default: /tmp/out).
# Sections: tests (FP8 kernel tests vs the torch oracle), micro (each FP8 kernel vs bf16 per call on Llama-3.1-8B's
# shapes at M = 1, 4, 16, 64, 128; MICRO_FLAGS, e.g. --sweep gemv,w8a8 --skip-main, or --tma --skip-main: the TMA
# GEMM's launch shapes vs bf16, _scaled_mm and w8a8 at M = 16..256), latency (bs1 32/128 decode;
# LATENCY_MODES), throughput (64 x 512/128; THROUGHPUT_MODES).
# A mode is bf16, fp8, or fp8:NAME=VALUE[,NAME=VALUE] with fp8_gemm's kernel switches set in-process, e.g.
# fp8:FUSED_QUANT_MAX_ROWS=0 or fp8:GEMV_MAX_ROWS=0 (bench_with_fp8_settings.py).
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline -1 2>/dev/null || echo "(no git)"
filter() { grep -v "^\[bench\]" | tail -${BENCH_TAIL:-6}; }
benchm() {  # benchm MODE BENCH_ARGS...: the bench of MODE (bf16 adds nothing, fp8 modes --quantization fp8)
  local mode=$1; shift
  if [ "$mode" = bf16 ]; then
    timeout ${BENCH_TIMEOUT:-150} python3 -m pagedllm.bench "$@" 2>&1 | filter
  elif [ "$mode" = fp8 ]; then
    timeout ${BENCH_TIMEOUT:-150} python3 -m pagedllm.bench "$@" --quantization fp8 2>&1 | filter
  else
    timeout ${BENCH_TIMEOUT:-150} python3 benchmarks/scripts/bench_with_fp8_settings.py "${mode#fp8:}" "$@" \
      --quantization fp8 2>&1 | filter
  fi; }
label() { echo "$1" | tr ':,=' '_+-'; }  # a mode as a file-name part
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
    tests)
      timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/model/quantization/test_fp8_kernels.py \
        tests/model/quantization/test_fp8_gemv.py tests/model/quantization/test_fp8_tma.py 2>&1 | tail -15 ;;
    micro)
      timeout ${MICRO_TIMEOUT:-120} python3 benchmarks/scripts/fp8_microbench.py $MICRO_FLAGS \
        --output-json "$OUT/fp8-microbench${MICRO_TAG}.json" 2>&1 | tail -${MICRO_TAIL:-140} ;;
    latency)
      for mode in ${LATENCY_MODES:-bf16 fp8}; do
        echo "--- latency $mode"
        benchm $mode latency --model llama-3.1-8b --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 \
          --num-iters ${LATENCY_ITERS:-3} --output-json "$OUT/latency-llama-3.1-8b-bs1-$(label $mode).json"
      done ;;
    throughput)
      for mode in ${THROUGHPUT_MODES:-bf16 fp8}; do
        echo "--- throughput $mode"
        benchm $mode throughput --disable-tqdm --model llama-3.1-8b --workload random --input-len 512 --output-len 128 \
          --num-prompts 64 --max-num-seqs 64 --output-json "$OUT/throughput-llama-3.1-8b-64x512-128-$(label $mode).json"
      done ;;
  esac
done
echo "=== done $(date +%T)"
