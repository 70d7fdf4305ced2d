#!/usr/bin/env bash
# Session 32's third H200 call (~380 s), PDL on by default: do the fused input prologues pay now that each kernel's
# launch overlaps the one before? Batch-1 decode step, default vs +fused_norm_act (RMSNorm and SiLU-and-mul inside
# the skinny GEMM's prologue: 3 fewer launches a layer), Qwen3-0.6B and Llama-3.1-8B, two interleaved repeats; FP8
# weights default vs the fused-input GEMV (FUSE_INPUT_INTO_GEMV=1); then a kernel profile of Qwen3-0.6B's batch-1
# decode graph with PDL on. Carry .whl and .assets; from the repo root:   bash benchmarks/scripts/next_call10.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next10; mkdir -p $WORK
LIMIT=${LIMIT:-420}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK .; }
show() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], round(r['decode_step_ms'], 4))" \
  $WORK/$1.json $1 2>/dev/null || { echo "$1 failed"; tail -n 4 $WORK/$1.log; }; }
latency() {  # latency RECORD LAUNCHER...: a batch-1 32/128 latency run of the launcher's bench on $MODEL_ARGS
  local record=$1; shift
  timeout 100 "$@" latency $MODEL_ARGS --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
    --output-json $WORK/$record.json > $WORK/$record.log 2>&1
  show $record
}
for model in qwen3-0.6b llama-3.1-8b; do
  for repeat in 1 2; do
    for mode in default fused; do
      [ $SECONDS -lt $LIMIT ] || break 3
      switch=""; [ $mode = fused ] && switch=+fused_norm_act
      MODEL_ARGS="--model $model" latency latency-$model-bs1-$mode-$repeat \
        python3 benchmarks/scripts/without_decode_kernels.py "$switch" -m pagedllm.bench
    done
  done
  pack
done
for mode in default fused; do
  [ $SECONDS -lt $LIMIT ] || break
  settings=""; [ $mode = fused ] && settings=FUSE_INPUT_INTO_GEMV=1
  MODEL_ARGS="--model llama-3.1-8b --quantization fp8" latency latency-llama-3.1-8b-bs1-fp8-$mode \
    python3 benchmarks/scripts/bench_with_fp8_settings.py "$settings"
done
pack
if [ $SECONDS -lt $((LIMIT + 40)) ]; then
  timeout 100 python3 benchmarks/scripts/profile_decode_kernels.py --model qwen3-0.6b --context 100 \
    > $WORK/profile-decode-kernels-qwen3-0.6b-pdl.log 2>&1
  grep -i "replay\|total\|kernels" $WORK/profile-decode-kernels-qwen3-0.6b-pdl.log | head -n 8
fi
pack
echo "=== done $(date +%T) ($SECONDS s)"
