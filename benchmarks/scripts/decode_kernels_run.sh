#!/usr/bin/env bash
# Issue 14's decode kernels on the GPU machine, in one device call: `bash benchmarks/scripts/decode_kernels_run.sh
# SECTION...` from the repo root with .whl and .assets carried. "before" runs switch the new kernels off in the same
# tree (benchmarks/scripts/without_decode_kernels.py). Everything lands in $OUT/results.tgz (the device returns at
# most 8 files); the terminal gets the summaries.
source benchmarks/scripts/device_env.sh || exit 1
RESULTS=/tmp/decode-kernels; mkdir -p $RESULTS
OFF="benchmarks/scripts/without_decode_kernels.py skinny_gemm"
latency() {  # model tag [wrapper...]
  local model=$1 tag=$2; shift 2
  timeout 150 python3 "$@" -m pagedllm.bench latency --model $model --batch-size 1 --input-len 32 --output-len 128 \
    --output-json $RESULTS/latency-$model-bs1-$tag.json > $RESULTS/latency-$model-$tag.log 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], 'decode_step_ms',
    round(r['decode_step_ms'], 3), 'prefill_ms', round(r['prefill_latency']['mean_s']*1e3, 3))" \
    $RESULTS/latency-$model-bs1-$tag.json $model $tag || tail -5 $RESULTS/latency-$model-$tag.log
}
profile() {  # model tag [wrapper...]
  local model=$1 tag=$2; shift 2
  timeout 150 python3 "$@" benchmarks/scripts/profile_decode_kernels.py --model $model \
    > $RESULTS/profile-decode-kernels-$model-$tag.log 2>&1
  grep -A4 '"replay_bs1_ms"' $RESULTS/profile-decode-kernels-$model-$tag.log | tr -d '\n'; echo " [$model $tag]"
}
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
    tests)
      timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/model/test_skinny_gemm.py \
        tests/attention/test_triton_paged.py 2>&1 | tail -4 ;;
    tests-bf16)  # the kernel serves half precision only: the GPU parity tests that run bfloat16 models
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_skinny_gemm.py \
        tests/entrypoints/test_gpu.py -k "bfloat16 or skinny or real_shapes or graph_replay or routes" 2>&1 | tail -4 ;;
    sweep)
      timeout 240 python3 benchmarks/scripts/bench_skinny_gemm.py --sweep --output-json $RESULTS/skinny-gemm-sweep.json \
        2>&1 | tee $RESULTS/skinny-gemm-sweep.log | grep -v Warning ;;
    micro)
      timeout 120 python3 benchmarks/scripts/bench_skinny_gemm.py --output-json $RESULTS/skinny-gemm.json \
        2>&1 | tee $RESULTS/skinny-gemm.log ;;
    latency-*) model=${section#latency-}; latency $model before $OFF; latency $model after ;;
    profile-ab-*) model=${section#profile-ab-}; profile $model before $OFF; profile $model after ;;
    profile-*) model=${section#profile-}; profile $model after ;;
  esac
done
git rev-parse HEAD > $RESULTS/commit.txt; git status --short > $RESULTS/git-status.txt
tar czf $OUT/results.tgz -C $RESULTS .
