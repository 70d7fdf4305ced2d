#!/usr/bin/env bash
# Session 33, call 2 (~400 s): with the LM head inside the decode graphs by default, (1) the GPU test files whose
# two failures call 1 did not name (its log was cut by the timeout), with the failures written to tests.log;
# (2) the batch-1 decode graph of Qwen3-0.6B kernel by kernel, default and with SiLU-and-mul in the gate/up
# epilogue (GPU time only: the end-to-end step is host-noisy at this size); (3) batch-1 decode step of Qwen3-0.6B,
# default / LM head outside the graphs / epilogue, interleaved.
# Carry .whl and .assets; from the repo root:   bash benchmarks/scripts/next_call14.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next14; mkdir -p $WORK
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK .; }
latency() {  # latency RECORD SWITCHES BENCH_ARGS...
  local record=$1 switches=$2; shift 2
  timeout 100 python3 benchmarks/scripts/without_decode_kernels.py "$switches" -m pagedllm.bench latency "$@" \
    --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
    --output-json $WORK/$record.json > $WORK/$record.log 2>&1
  grep "decode step" $WORK/$record.log | sed "s/^/$record: /" || tail -n 3 $WORK/$record.log
}
echo "=== tests $(date +%T)"
timeout 230 python3 -m pytest -q -p no:cacheprovider -rf tests/model/quantization/test_w4a16_kernel.py \
  tests/entrypoints/test_gpu.py tests/worker/test_model_runner_graph_path.py tests/attention/test_sliding_window.py \
  tests/lora/test_punica.py tests/model/quantization/test_fp8_kernels.py > $WORK/tests.log 2>&1
grep -E "^FAILED|^ERROR|passed|failed" $WORK/tests.log | tail -n 12
pack
for switches in "" +silu_epilogue; do
  timeout 80 python3 benchmarks/scripts/without_decode_kernels.py "$switches" benchmarks/scripts/profile_decode_kernels.py \
    --model qwen3-0.6b --context 100 > $WORK/profile-decode-kernels-qwen3-0.6b${switches:+-epilogue}.log 2>&1
  grep -A12 '"replay_bs1_ms"' $WORK/profile-decode-kernels-qwen3-0.6b${switches:+-epilogue}.log | grep -v "^ *\"model\|quant\|context\|max_model" | tr -d '\n'; echo " [$switches]"
done
pack
for repeat in 1 2; do
  latency latency-qwen3-0.6b-bs1-default-$repeat "" --model qwen3-0.6b
  latency latency-qwen3-0.6b-bs1-no_graph_logits-$repeat graph_logits --model qwen3-0.6b
  latency latency-qwen3-0.6b-bs1-epilogue-$repeat +silu_epilogue --model qwen3-0.6b
done
pack
echo "=== done $(date +%T) ($SECONDS s)"
