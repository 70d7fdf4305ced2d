#!/usr/bin/env bash
# Session 33, call 4 (~250 s, the last of the session's device budget): (1) the engine-level GPU tests with rotary
# inside the decode kernel (float32 greedy parity with HF, graphs vs eager steps, no compile inside a step), which
# call 3's test budget did not reach; (2) the batch-1 decode step of Llama-3.1-8B bf16 and FP8, default vs
# decode_rotary off, interleaved (call 3: 4.13 vs 4.17 ms and 2.65 vs 2.60 ms).
# Carry .whl and .assets; from the repo root:   bash benchmarks/scripts/next_call16.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next16; mkdir -p $WORK
LIMIT=${LIMIT:-215}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK .; }
latency() {  # latency RECORD SWITCHES BENCH_ARGS...
  local record=$1 switches=$2; shift 2
  [ $SECONDS -lt $LIMIT ] || return 0
  timeout 60 python3 benchmarks/scripts/without_decode_kernels.py "$switches" -m pagedllm.bench latency "$@" \
    --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
    --output-json $WORK/$record.json > $WORK/$record.log 2>&1
  grep "decode step" $WORK/$record.log | sed "s/^/$record: /" || tail -n 3 $WORK/$record.log
}
echo "=== tests $(date +%T)"
timeout 100 python3 -m pytest -q -p no:cacheprovider -rf tests/entrypoints/test_gpu.py > $WORK/tests.log 2>&1
grep -E "^FAILED|^ERROR|passed|failed" $WORK/tests.log | tail -n 12; tail -n 2 $WORK/tests.log
pack
latency latency-llama-3.1-8b-bs1-fp8-no_decode_rotary decode_rotary --model llama-3.1-8b --quantization fp8
latency latency-llama-3.1-8b-bs1-fp8-default "" --model llama-3.1-8b --quantization fp8
latency latency-llama-3.1-8b-bs1-no_decode_rotary decode_rotary --model llama-3.1-8b
latency latency-llama-3.1-8b-bs1-default "" --model llama-3.1-8b
pack
echo "=== done $(date +%T) ($SECONDS s)"
