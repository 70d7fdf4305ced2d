#!/usr/bin/env bash
# Issue 16, FP8 weights on the GPU machine: `bash benchmarks/scripts/issue16_fp8_run.sh SECTION...` from the repo root
# with .whl and .assets carried (see device_env.sh). Records and logs go to $OUT (default: /tmp/out).
# Sections: tests (FP8 kernel tests vs the torch oracle), micro (FP8 vs bf16 linear on Llama-3.1-8B shapes;
# MICRO_FLAGS, e.g. --sweep), latency (bs1 32/128 decode: bf16, fp8, fp8wo = fp8 with the weight-only decode
# kernel; LATENCY_MODES), throughput (64 x 512/128: bf16, fp8; THROUGHPUT_MODES).
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline -1 2>/dev/null || echo "(no git)"
bench() { timeout ${BENCH_TIMEOUT:-150} python3 -m pagedllm.bench "$@" 2>&1 | grep -v "^\[bench\]" | tail -${BENCH_TAIL:-6}; }
quant_flag() { [ "$1" = bf16 ] && echo "" || echo "--quantization fp8"; }
# Mode fp8wo: --quantization fp8 with the weight-only decode kernel (fp8_gemm.DECODE_KERNEL), set in-process.
benchm() { local mode=$1; shift; if [ "$mode" = fp8wo ]; then
  timeout ${BENCH_TIMEOUT:-150} python3 -c "import runpy,sys;import pagedllm.model.quantization.fp8_gemm as g;g.DECODE_KERNEL='weight_only';sys.argv[0]='bench';runpy.run_module('pagedllm.bench',run_name='__main__')" "$@" 2>&1 | grep -v "^\[bench\]" | tail -${BENCH_TAIL:-6}
  else bench "$@"; fi; }
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
    tests)
      timeout ${TESTS_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider tests/model/quantization/test_fp8_kernels.py 2>&1 | tail -12 ;;
    micro)
      timeout ${MICRO_TIMEOUT:-60} python3 benchmarks/scripts/fp8_microbench.py $MICRO_FLAGS --output-json "$OUT/fp8-microbench.json" 2>&1 | tail -60 ;;
    latency)
      for mode in ${LATENCY_MODES:-bf16 fp8 fp8wo}; do
        echo "--- latency $mode"
        benchm $mode latency --model llama-3.1-8b --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 \
          --num-iters ${LATENCY_ITERS:-3} $(quant_flag $mode) --output-json "$OUT/latency-llama-3.1-8b-bs1-$mode.json"
      done ;;
    throughput)
      for mode in ${THROUGHPUT_MODES:-bf16 fp8}; do
        echo "--- throughput $mode"
        benchm $mode throughput --disable-tqdm --model llama-3.1-8b --workload random --input-len 512 --output-len 128 \
          --num-prompts 64 --max-num-seqs 64 $(quant_flag $mode) \
          --output-json "$OUT/throughput-llama-3.1-8b-64x512-128-$mode.json"
      done ;;
  esac
done
echo "=== done $(date +%T)"
