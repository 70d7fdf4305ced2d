#!/usr/bin/env bash
# Session 33, call 3 (~480 s): rotary (with Qwen3's q/k norm) and the K/V store inside the decode attention kernel
# (layers.FUSE_ROTARY_INTO_DECODE; `without_decode_kernels.py decode_rotary` switches it off), with the SiLU gate/up
# epilogue removed. (1) GPU tests: the new kernel, the attention kernels, the engine-level GPU files, the skinny GEMM
# and the quantized kernels the removal touched; (2) batch-1 decode step, default vs decode_rotary off, interleaved:
# Qwen3-0.6B twice (issue 14's 0.8 ms), Llama-3.1-8B (4.2 ms), Llama-3.1-8B FP8 (issue 16's 2.5 ms), then GPTQ and
# Qwen3-30B-A3B defaults; (3) the Qwen3-0.6B decode graph kernel by kernel.
# Carry .whl and .assets; from the repo root:   bash benchmarks/scripts/next_call15.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next15; mkdir -p $WORK
LIMIT=${LIMIT:-430}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK .; }
latency() {  # latency RECORD SWITCHES BENCH_ARGS...
  local record=$1 switches=$2; shift 2
  [ $SECONDS -lt $LIMIT ] || return 0
  timeout 100 python3 benchmarks/scripts/without_decode_kernels.py "$switches" -m pagedllm.bench latency "$@" \
    --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
    --output-json $WORK/$record.json > $WORK/$record.log 2>&1
  grep "decode step" $WORK/$record.log | sed "s/^/$record: /" || tail -n 3 $WORK/$record.log
}
echo "=== tests $(date +%T)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --maxfail=5 tests/attention/test_decode_rotary.py \
  tests/attention/test_triton_paged.py tests/attention/test_triton_paged_fp8.py tests/attention/test_sliding_window.py \
  tests/entrypoints/test_gpu.py tests/entrypoints/test_llm_kv_cache_fp8.py tests/model/test_skinny_gemm.py \
  tests/model/quantization/test_fp8_gemv.py tests/model/quantization/test_w4a16_kernel.py > $WORK/tests.log 2>&1
grep -E "^FAILED|^ERROR|passed|failed" $WORK/tests.log | tail -n 12; tail -n 2 $WORK/tests.log
pack
for repeat in 1 2; do
  latency latency-qwen3-0.6b-bs1-default-$repeat "" --model qwen3-0.6b
  latency latency-qwen3-0.6b-bs1-no_decode_rotary-$repeat decode_rotary --model qwen3-0.6b
done
latency latency-llama-3.1-8b-bs1-default "" --model llama-3.1-8b
latency latency-llama-3.1-8b-bs1-no_decode_rotary decode_rotary --model llama-3.1-8b
latency latency-llama-3.1-8b-bs1-fp8-default "" --model llama-3.1-8b --quantization fp8
latency latency-llama-3.1-8b-bs1-fp8-no_decode_rotary decode_rotary --model llama-3.1-8b --quantization fp8
pack
latency latency-llama-3.1-8b-bs1-gptq-default "" --model llama-3.1-8b --quantization gptq
latency latency-qwen3-30b-a3b-bs1-default "" --model qwen3-30b-a3b
pack
if [ $SECONDS -lt $((LIMIT + 20)) ]; then
  timeout 60 python3 benchmarks/scripts/profile_decode_kernels.py --model qwen3-0.6b --context 100 \
    > $WORK/profile-decode-kernels-qwen3-0.6b.log 2>&1
  grep -A12 '"replay_bs1_ms"' $WORK/profile-decode-kernels-qwen3-0.6b.log | tr -d '\n'; echo
fi
pack
echo "=== done $(date +%T) ($SECONDS s)"
