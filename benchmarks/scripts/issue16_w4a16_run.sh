#!/usr/bin/env bash
# Issue 16, W4A16 on the GPU machine: `bash benchmarks/scripts/issue16_w4a16_run.sh SECTION...` from the repo root
# with .whl and .assets carried (see device_env.sh). Records and logs go to $OUT (default: /tmp/out).
# Sections: tests (kernel tests vs the torch oracle), sass (the GEMV and tl.dot kernels' K loops as this Triton
# compiles them: registers, instructions per weight, no shared-memory re-layout), micro (GEMV vs tl.dot vs
# dequantize + cuBLAS vs bf16 on Llama-3.1-8B shapes at M = 1..256, a layer's sum per M and the dispatch constants
# it implies; MICRO_FLAGS=--sweep adds the tl.dot launch-shape sweep), latency (bs1 32/128 decode: bf16, gptq,
# awq; LATENCY_MODES), throughput (64 x 512/128: bf16, gptq; THROUGHPUT_MODES).
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline -1 2>/dev/null || echo "(no git)"
bench() { timeout 240 python3 -m pagedllm.bench "$@" 2>&1 | grep -v "^\[bench\]" | tail -${BENCH_TAIL:-6}; }
quant_flag() { [ "$1" = bf16 ] && echo "" || echo "--quantization $1"; }
for section in "$@"; do
  echo "=== $section"
  case $section in
    tests)
      timeout 320 python3 -m pytest -q -p no:cacheprovider tests/model/quantization/test_w4a16_kernel.py 2>&1 | tail -8 ;;
    sass)
      TRITON_INTERPRET= timeout 100 python3 benchmarks/scripts/w4a16_gemv_sass.py 2>&1 | tail -16 ;;
    micro)
      timeout 240 python3 benchmarks/scripts/w4a16_microbench.py $MICRO_FLAGS --output-json "$OUT/w4a16-microbench.json" 2>&1 | tail -120 ;;
    latency)
      for mode in ${LATENCY_MODES:-bf16 gptq awq}; do
        echo "--- latency $mode"
        bench latency --model llama-3.1-8b --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 \
          --num-iters ${LATENCY_ITERS:-5} $(quant_flag $mode) --output-json "$OUT/latency-llama-3.1-8b-bs1-$mode.json"
      done ;;
    throughput)
      for mode in ${THROUGHPUT_MODES:-bf16 gptq}; do
        echo "--- throughput $mode"
        bench throughput --disable-tqdm --model llama-3.1-8b --workload random --input-len 512 --output-len 128 \
          --num-prompts 64 --max-num-seqs 64 $(quant_flag $mode) \
          --output-json "$OUT/throughput-llama-3.1-8b-64x512-128-$mode.json"
      done ;;
  esac
done
