#!/usr/bin/env bash
# Prepared in session 30 for the next session's first H200 call (~560 s): programmatic dependent launch for the
# batch-1 decode step, off vs the next kernel placed right after each kernel's wait (+pdl, measured in session 22
# only with the slower fused prologues on) vs after each GEMM's, attention and MoE kernel's main loop (+pdl_late,
# never measured); same call, interleaved, Qwen3-0.6B, Llama-3.1-8B and Qwen3-30B-A3B (issue 14's 0.8 and 4.2 ms
# targets, issue 19's 70% of roofline). Then issue 19's nano throughput of 2 prompts, fused eager vs the torch path
# (it did not finish 4 prompts in 150 s in session 30). Carry .whl and .assets; from the repo root:
#   bash benchmarks/scripts/next_call8.sh   (SKIP_NANO=1: the latency A/B only)
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next8; mkdir -p $WORK/pdl
LIMIT=${LIMIT:-420}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK pdl; }
echo "=== tests $(date +%T)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -rf tests/model/test_skinny_gemm.py -k pdl 2>&1 | tail -n 4
timeout 120 python3 -m pytest -q -p no:cacheprovider -rf tests/entrypoints/test_gpu.py \
  -k test_no_kernel_compiles_inside_a_step_after_start_up 2>&1 | tail -n 6
for model in qwen3-0.6b llama-3.1-8b qwen3-30b-a3b; do
  repeats="1 2"; [ $model = qwen3-30b-a3b ] && repeats="1"  # its runs are the longest (~45 s)
  for repeat in $repeats; do
    for mode in off +pdl +pdl_late; do
      [ $SECONDS -lt $LIMIT ] || break 3
      switch=$mode; [ $mode = off ] && switch=""
      record=$WORK/pdl/latency-$model-bs1-pdl-${mode#+}-$repeat.json
      timeout 90 python3 benchmarks/scripts/without_decode_kernels.py "$switch" -m pagedllm.bench latency \
        --model $model --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
        --output-json $record > $WORK/pdl/latency-$model-${mode#+}-$repeat.log 2>&1
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], 'decode_step_ms',
        round(r['decode_step_ms'], 4), 'prefill_ms', round(r['prefill_latency']['mean_s']*1e3, 2))" \
        $record $model $mode || tail -4 $WORK/pdl/latency-$model-${mode#+}-$repeat.log
    done
  done
  pack
done
if [ -z "$SKIP_NANO" ] && [ $SECONDS -lt $((LIMIT + 60)) ]; then
  OUT=$WORK/pdl NANO_SMALL=2 BENCH_TIMEOUT=200 SKIP_FUSED_GRAPHS=1 bash benchmarks/scripts/issue19_moe_run.sh throughput \
    2>&1 | grep -v "^NVIDIA" | grep "throughput nano\|pagedllm \|rror" | tail -n 8
  pack
fi
echo "=== done $(date +%T) ($SECONDS s)"
