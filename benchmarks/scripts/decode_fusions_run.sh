#!/usr/bin/env bash
# Issue 14's decode fusions on the GPU machine, in ONE device call with a tight budget: `bash
# benchmarks/scripts/decode_fusions_run.sh SECONDS` from the repo root with .whl and .assets carried. Runs the
# sections below in order while SECONDS allow (a section starts only if its own time fits), each variant in the same
# call through benchmarks/scripts/without_decode_kernels.py switches: "before" = rotary + KV store unfused (the tree
# before this work), "after" = the defaults, then the variants that are off by default (+fused_norm_act: norm and
# activation in the GEMM prologue; +pdl). Everything lands in $OUT/results.tgz (the device returns at most 8 files).
# (The call of benchmarks/h200/issue14-decode-fusions ran this script as it is in that folder's as-measured.patch.)
BUDGET=${1:-190}
source benchmarks/scripts/device_env.sh || exit 1
RESULTS=/tmp/decode-fusions; mkdir -p $RESULTS
OFF=benchmarks/scripts/without_decode_kernels.py
LAT=(-m pagedllm.bench latency --batch-size 1 --input-len 32 --output-len 128 --max-num-seqs 8)
fits() { [ $((SECONDS + $1)) -le $BUDGET ]; }  # fits NEEDED_SECONDS
latency() {  # model tag switches limit: one bench latency run with those switches ("-": none)
  local model=$1 tag=$2 switches=$3 limit=$4
  fits $limit || { echo "skip latency $model $tag (t=${SECONDS}s)"; return; }
  local wrapper=(); [ "$switches" != "-" ] && wrapper=($OFF $switches)
  timeout $limit python3 "${wrapper[@]}" "${LAT[@]}" --model $model --output-json $RESULTS/latency-$model-bs1-$tag.json \
    > $RESULTS/latency-$model-$tag.log 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], 'decode_step_ms',
    round(r['decode_step_ms'], 4), 'prefill_ms', round(r['prefill_latency']['mean_s']*1e3, 3))" \
    $RESULTS/latency-$model-bs1-$tag.json $model "$tag [switches: $switches] t=${SECONDS}s" 2>/dev/null \
    || { echo "FAILED latency $model $tag t=${SECONDS}s"; grep -v "^\[bench\]" $RESULTS/latency-$model-$tag.log | tail -6; }
}
pytest_section() {  # name limit pytest-args...: runs only if 30 s are left, cut at the budget
  local name=$1 limit=$2; shift 2
  fits 30 || { echo "skip $name (t=${SECONDS}s)"; return; }
  limit=$(( limit < BUDGET - SECONDS ? limit : BUDGET - SECONDS ))
  timeout $limit python3 -m pytest -v -p no:cacheprovider "$@" > $RESULTS/$name.log 2>&1
  echo "--- $name (t=${SECONDS}s)"; grep -E "PASSED|FAILED|ERROR" $RESULTS/$name.log | sed 's/ *\[.*%\]//' | tail -30
  tail -1 $RESULTS/$name.log
}
echo "=== $(date +%T) start t=${SECONDS}s"
latency qwen3-0.6b before rotary_store 60
latency qwen3-0.6b after - 60
latency qwen3-0.6b fused-norm-act +fused_norm_act 40
latency qwen3-0.6b pdl +pdl 40
# The served bf16 path end to end (graphs), the fused kernels compiled in bf16 on real shapes and PDL chains in a
# CUDA graph; then the rest of the engine's GPU tests.
pytest_section tests-kernels 50 tests/entrypoints/test_gpu.py tests/model/test_skinny_gemm.py tests/model/test_triton_ops.py \
  -k "top1 or real_shapes_rms or real_shapes_silu or pdl_chain or graph_replay or never_splits or replay_in_a_cuda_graph \
  or (store_kv and dtype0 and shape0)"
pytest_section tests-gpu 80 tests/entrypoints/test_gpu.py -k "not top1"
latency llama-3.1-8b before rotary_store 40
latency llama-3.1-8b after - 40
echo "=== $(date +%T) end t=${SECONDS}s"
git rev-parse HEAD > $RESULTS/commit.txt; git status --short > $RESULTS/git-status.txt
tar czf $OUT/results.tgz -C $RESULTS .
