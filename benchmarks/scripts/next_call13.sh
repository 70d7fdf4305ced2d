#!/usr/bin/env bash
# Prepared in session 32 for the next session's first H200 call (~540 s): (1) the GPU tests of the gate/up SiLU
# epilogue (gemm_silu_mul, the whole tiny model routed through it), of the LM head inside the decode graphs, and the
# GPU test files session 32's budget left unrun with PDL on; (2) batch-1 decode step, interleaved: default,
# +silu_epilogue (one launch and one [rows, 2 x intermediate] round trip fewer a layer), +graph_logits (the LM head
# inside the decode graphs: its host work leaves the step) and both; Qwen3-0.6B twice, Llama-3.1-8B once (issue
# 14's 0.8 and 4.2 ms targets), and Llama-3.1-8B with FP8 weights, default vs the FP8 GEMV's epilogue (issue 16's
# 2.5 ms); (3) a py-spy profile of the host during a Qwen3-0.6B batch-1 latency run (session 32 found that
# step host-bound: 1.39 ms of host work a step against a ~0.9 ms GPU step). Carry .whl and .assets; from the repo
# root:   bash benchmarks/scripts/next_call13.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next13; mkdir -p $WORK
LIMIT=${LIMIT:-470}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK .; }
echo "=== tests $(date +%T)"
timeout 170 python3 -m pytest -q -p no:cacheprovider -rf tests/model/test_skinny_gemm.py tests/model/test_triton_ops.py \
  tests/entrypoints/test_gpu.py -k "not float32_greedy_parity and not stories260k and not bfloat16_top1" \
  tests/model/quantization/test_fp8_gemv.py tests/model/quantization/test_fp8_models.py \
  tests/model/quantization/test_fp8_kernels.py tests/attention/test_sliding_window.py tests/lora/test_punica.py \
  2>&1 | tail -n 6
for model in qwen3-0.6b llama-3.1-8b; do
  repeats="1 2"; [ $model = llama-3.1-8b ] && repeats="1"
  for repeat in $repeats; do
    for mode in default epilogue graph_logits both; do
      [ $SECONDS -lt $LIMIT ] || break 3
      case $mode in
        default) switch="" ;; epilogue) switch=+silu_epilogue ;; graph_logits) switch=+graph_logits ;;
        both) switch=+silu_epilogue,+graph_logits ;;
      esac
      record=latency-$model-bs1-$mode-$repeat
      timeout 100 python3 benchmarks/scripts/without_decode_kernels.py "$switch" -m pagedllm.bench latency \
        --model $model --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
        --output-json $WORK/$record.json > $WORK/$record.log 2>&1
      grep "decode step" $WORK/$record.log | sed "s/^/$record: /" || tail -n 3 $WORK/$record.log
    done
  done
  pack
done
for mode in default epilogue; do  # FP8 weights: the GEMV's epilogue (issue 16's 2.5 ms)
  [ $SECONDS -lt $LIMIT ] || break
  switch=""; [ $mode = epilogue ] && switch=+silu_epilogue
  record=latency-llama-3.1-8b-bs1-fp8-$mode
  timeout 100 python3 benchmarks/scripts/without_decode_kernels.py "$switch" -m pagedllm.bench latency \
    --model llama-3.1-8b --quantization fp8 --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 \
    --num-iters 3 --output-json $WORK/$record.json > $WORK/$record.log 2>&1
  grep "decode step" $WORK/$record.log | sed "s/^/$record: /" || tail -n 3 $WORK/$record.log
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
