#!/usr/bin/env bash
# Data parallelism (issue 18 item 4) for the multi-GPU issue, on a machine with 2 GPUs (not run yet):
#   1. the nano workload (nano-vllm's: 256 requests, random 100-1024 in / 100-1024 out) at unlimited rate through
#      `pagedllm serve` with --data-parallel-size 1 and 2: total output tokens/s (dp 2 should be close to 2x);
#   2. a sharegpt-like workload at rate R with dp 1 and at 2R with dp 2: the same TTFT / inter-token percentiles at
#      twice the load is what linear scaling looks like;
#   3. the shared-prefix workload with dp 2: the prefix-cache hit rate per engine (affinity keeps a prefix on one
#      replica), from /metrics, next to the dp 1 rate.
# Records (bench serve JSON, /metrics snapshots, server logs) go to $OUT. Usage, from the repo root:
#   bash benchmarks/scripts/data_parallel_run.sh           (carry .whl and .assets, as device_env.sh says)
# MODEL (default qwen3-0.6b config, dummy weights), RATE (default 8 req/s) and NUM_PROMPTS (default 400) override.
set -u
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/data-parallel}; mkdir -p "$OUT"
MODEL=${MODEL:-pagedllm/bench/configs/qwen3-0.6b}
RATE=${RATE:-8}
NUM_PROMPTS=${NUM_PROMPTS:-400}
PORT=8012
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"

start_server() {  # start_server DP TAG: serve in the background until /health answers; SERVER = its pid
  python3 -m pagedllm.entrypoints.cli serve "$MODEL" --load-format dummy --tokenizer .assets/tokenizers/qwen3 \
    --served-model-name bench --port $PORT --data-parallel-size "$1" --disable-log-stats \
    > "$OUT/server-$2.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do curl -sf localhost:$PORT/health > /dev/null && break; sleep 1; done
  grep -m3 "Data parallel\|Data-parallel engine" "$OUT/server-$2.log"
}
stop_server() {  # stop_server TAG: keep the metrics, SIGTERM, wait
  curl -s localhost:$PORT/metrics > "$OUT/metrics-$1.txt"
  kill -TERM "$SERVER"; wait "$SERVER"; echo "server $1 exit code $?"
}
bench() {  # bench TAG ARGS...: bench serve against the running server
  echo "--- $1"
  local tag=$1; shift
  timeout 300 python3 -m pagedllm.bench serve --disable-tqdm --base-url http://127.0.0.1:$PORT --model bench \
    --label "pagedllm-$tag" --output-json "$OUT/serve-$tag.json" "$@" 2>&1 | grep -v "^\[bench\]" | tail -6
}
prefix_hit_rate() {  # prefix_hit_rate TAG: hits / queries per engine label, from the kept metrics
  python3 - "$OUT/metrics-$1.txt" <<'PY'
import sys
from collections import defaultdict
from prometheus_client.parser import text_string_to_metric_families
totals = defaultdict(lambda: [0.0, 0.0])
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        if s.name in ("pagedllm:prefix_cache_hits_total", "pagedllm:prefix_cache_queries_total"):
            totals[s.labels.get("engine", "-")][s.name.endswith("queries_total")] += s.value
for engine, (hits, queries) in sorted(totals.items()):
    print(f"engine {engine}: prefix-cache hit rate {hits / max(queries, 1):.3f} ({hits:.0f} / {queries:.0f} tokens)")
PY
}

for dp in 1 2; do
  start_server $dp dp$dp
  bench nano-dp$dp --workload nano --request-rate inf
  rate=$((RATE * dp))
  bench sharegpt-rate$rate-dp$dp --workload sharegpt-like --num-prompts "$NUM_PROMPTS" --request-rate "$rate"
  stop_server dp$dp
  start_server $dp prefix-dp$dp
  bench shared-prefix-dp$dp --workload shared-prefix --num-prompts "$NUM_PROMPTS" --request-rate "$rate"
  stop_server prefix-dp$dp
  prefix_hit_rate prefix-dp$dp
done
python3 benchmarks/scripts/summarize_records.py "$OUT"
