#!/usr/bin/env bash
# Is the first burst after a server start slower? Start `pagedllm serve` on the tiny model with the free forward
# (free_model/sitecustomize.py), wait for the grammar compile workers + WAIT s (5), replay WORKLOAD (make_workload.py;
# default /tmp/workload-4096.json) three times at unlimited rate, print each run's output tok/s. Needs /tmp/tinyqwen3
# (build_tiny_qwen3.py). SERVE_FLAGS adds server flags (e.g. "--api-server-count 2").
#   bash first_burst.sh OUT_DIR
set -u
TREE=/work/main; HERE=$TREE/benchmarks/cpu/serve-frontend; PY=$TREE/.venv/bin/python; PORT=8031
OUT=${1:-/tmp/fb}; mkdir -p $OUT
cd $TREE
OMP_NUM_THREADS=1 PAGEDLLM_BENCH_FREE_MODEL=1 PYTHONPATH=$HERE/free_model:$TREE \
  $PY -m pagedllm.entrypoints.cli serve /tmp/tinyqwen3 --device cpu --tokenizer /work/shared/assets/tokenizers/qwen3 \
  --port $PORT --max-num-seqs 256 ${SERVE_FLAGS:-} > $OUT/server.log 2>&1 &
SERVER=$!
for _ in $(seq 120); do curl -sf localhost:$PORT/health > /dev/null && break; sleep 1; done
for _ in $(seq 60); do grep -q "compile workers ready" $OUT/server.log && break; sleep 1; done
sleep ${WAIT:-5}
for run in 1 2 3; do
  OMP_NUM_THREADS=1 PYTHONPATH=$TREE $PY -m pagedllm.bench serve --disable-tqdm --base-url http://127.0.0.1:$PORT \
    --workload-json "${WORKLOAD:-/tmp/workload-4096.json}" --request-rate inf --output-json "$OUT/serve-$run.json" \
    > "$OUT/bench-$run.txt" 2>&1
  $PY - "$OUT/serve-$run.json" "$run" <<'EOF'
import json, sys
record = json.load(open(sys.argv[1]))
metrics = record["metrics"]
print(f"run {sys.argv[2]}: {record['output_tokens_per_s']:,.0f} output tok/s, "
      f"TTFT mean {metrics['ttft_ms']['mean']:.0f} ms, {metrics['duration_s']:.2f} s")
EOF
done
kill -TERM $SERVER; wait $SERVER
