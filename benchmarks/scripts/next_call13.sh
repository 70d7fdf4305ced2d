#!/usr/bin/env bash
# Prepared in session 32 for the next session's first H200 call (~560 s). Two changes built after session 32's device
# budget ran out, both off until measured: SiLU-and-mul in the gate/up projection's epilogue (skinny GEMM, FP8 GEMV,
# W4A16 kernels: `+silu_epilogue`) and the LM head inside the decode graphs (`+graph_logits`).
# (1) their GPU tests, and the GPU test files session 32 left unrun with PDL on; (2) batch-1 decode step (32/128),
# interleaved: Qwen3-0.6B default / epilogue / graph logits / both, twice (issue 14's 0.8 ms); Llama-3.1-8B default
# and both (4.2 ms); Llama-3.1-8B FP8 and GPTQ, default and epilogue (issue 16's 2.5 and 1.7 ms); (3) if time is
# left, a py-spy profile of the host during a Qwen3-0.6B batch-1 run (session 32 found that step host-bound).
# Carry .whl and .assets; from the repo root:   bash benchmarks/scripts/next_call13.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next13; mkdir -p $WORK
LIMIT=${LIMIT:-450}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK .; }
latency() {  # latency RECORD SWITCHES BENCH_ARGS...: one batch-1 latency run with without_decode_kernels' switches
  local record=$1 switches=$2; shift 2
  [ $SECONDS -lt $LIMIT ] || return 0
  timeout 100 python3 benchmarks/scripts/without_decode_kernels.py "$switches" -m pagedllm.bench latency "$@" \
    --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
    --output-json $WORK/$record.json > $WORK/$record.log 2>&1
  grep "decode step" $WORK/$record.log | sed "s/^/$record: /" || tail -n 3 $WORK/$record.log
}
echo "=== tests $(date +%T)"
timeout 170 python3 -m pytest -q -p no:cacheprovider -rf tests/model/test_skinny_gemm.py tests/model/test_triton_ops.py \
  tests/entrypoints/test_gpu.py -k "not float32_greedy_parity and not stories260k and not bfloat16_top1" \
  tests/model/quantization/test_fp8_gemv.py tests/model/quantization/test_w4a16_kernel.py \
  tests/model/quantization/test_fp8_kernels.py tests/attention/test_sliding_window.py tests/lora/test_punica.py \
  2>&1 | tail -n 6
pack
for repeat in 1 2; do
  latency latency-qwen3-0.6b-bs1-default-$repeat "" --model qwen3-0.6b
  latency latency-qwen3-0.6b-bs1-epilogue-$repeat +silu_epilogue --model qwen3-0.6b
  latency latency-qwen3-0.6b-bs1-graph_logits-$repeat +graph_logits --model qwen3-0.6b
  latency latency-qwen3-0.6b-bs1-both-$repeat +silu_epilogue,+graph_logits --model qwen3-0.6b
done
latency latency-llama-3.1-8b-bs1-default "" --model llama-3.1-8b
latency latency-llama-3.1-8b-bs1-both +silu_epilogue,+graph_logits --model llama-3.1-8b
pack
for quant in fp8 gptq; do
  latency latency-llama-3.1-8b-bs1-$quant-default "" --model llama-3.1-8b --quantization $quant
  latency latency-llama-3.1-8b-bs1-$quant-epilogue +silu_epilogue --model llama-3.1-8b --quantization $quant
done
pack
if [ $SECONDS -lt $((LIMIT + 30)) ]; then
  timeout 100 /tmp/site/bin/py-spy record -r 500 -f raw --threads -o $WORK/pyspy-latency-qwen3-0.6b-bs1.raw -- \
    python3 -m pagedllm.bench latency --model qwen3-0.6b --batch-size 1 --input-len 32 --output-len 128 \
    --num-iters-warmup 1 --num-iters 10 > $WORK/pyspy-latency.log 2>&1
  python3 benchmarks/cpu/serve-frontend/pyspy_summary.py $WORK/pyspy-latency-qwen3-0.6b-bs1.raw 0.03 2>&1 | head -n 40
fi
pack
echo "=== done $(date +%T) ($SECONDS s)"
