#!/usr/bin/env bash
# Session 30's fourth H200 call (~300 s): batch-1 decode steps with each decode-attention split attending to at least
# 1 (now) or 4 key tiles (triton_paged.MIN_TILES_PER_SPLIT; at 4, the 256-token graphs run one split and no merge
# launch), same call, per model. Carry .whl and .assets; from the repo root:  bash benchmarks/scripts/next_call7.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next7; mkdir -p $WORK/splits
LIMIT=${LIMIT:-300}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK splits; }
for model in qwen3-0.6b llama-3.1-8b qwen3-30b-a3b; do
  [ $SECONDS -lt $LIMIT ] || break
  for tiles in 1 4; do
    record=$WORK/splits/latency-$model-bs1-split-tiles-$tiles.json
    timeout 110 python3 benchmarks/scripts/without_decode_kernels.py split_tiles=$tiles -m pagedllm.bench latency \
      --model $model --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
      --output-json $record > $WORK/splits/latency-$model-$tiles.log 2>&1
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'split_tiles', sys.argv[3],
      'decode_step_ms', round(r['decode_step_ms'], 4), 'prefill_ms', round(r['prefill_latency']['mean_s']*1e3, 2))" \
      $record $model $tiles || tail -4 $WORK/splits/latency-$model-$tiles.log
  done
  pack
done
echo "=== done $(date +%T) ($SECONDS s)"
