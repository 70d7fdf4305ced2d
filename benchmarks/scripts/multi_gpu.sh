#!/usr/bin/env bash
# Tensor / pipeline parallelism (issue 18 items 1-2) for the multi-GPU issue, on a machine with 8 GPUs (not run yet).
# One line, from the repo root (carry .whl and .assets, as device_env.sh says):
#   bash benchmarks/scripts/multi_gpu.sh
# 1. bench latency (batch 1 and 32, 128 in / 128 out, dummy weights) of the Llama-3.1-8B config at tp 1, 2, 4, 8;
# 2. the Llama-3.1-70B config (pagedllm/bench/configs/llama-3.1-70b, public config.json) at tp 4 and 8, and
#    tp 4 x pp 2 (bf16 weights: ~141 GB, so tp >= 2 on H200s);
# 3. the tp=1 path against the tree before parallelism (.base, if present): the same 8B latency, which must not
#    be slower (tp=1 issues no collective).
# Records (bench latency JSON) and logs go to $OUT. GPUS (default 8) caps the largest tp tried.
set -u
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/multi-gpu}; mkdir -p "$OUT"
GPUS=${GPUS:-8}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
latency() {  # latency TAG MODEL BATCH FLAGS...
  local tag=$1 model=$2 batch=$3; shift 3
  echo "--- $tag batch $batch: $*"
  timeout 600 python3 -m pagedllm.bench latency --model "$model" --load-format dummy --batch-size "$batch" \
    --input-len 128 --output-len 128 --num-iters-warmup 2 --num-iters 5 \
    --output-json "$OUT/latency-$tag-bs$batch.json" "$@" > "$OUT/latency-$tag-bs$batch.log" 2>&1
  tail -4 "$OUT/latency-$tag-bs$batch.log"
}
for tp in 1 2 4 8; do
  [ "$tp" -le "$GPUS" ] || continue
  for batch in 1 32; do latency "llama-3.1-8b-tp$tp" llama-3.1-8b "$batch" -tp "$tp"; done
done
for layout in "4 1" "8 1" "4 2"; do
  set -- $layout
  [ $(( $1 * $2 )) -le "$GPUS" ] || continue
  for batch in 1 32; do latency "llama-3.1-70b-tp$1-pp$2" llama-3.1-70b "$batch" -tp "$1" -pp "$2"; done
done
if [ -d .base ]; then  # the tp=1 path before and after: nothing slower
  for batch in 1 32; do
    (cd .base && latency "llama-3.1-8b-base" llama-3.1-8b "$batch")
  done
fi
