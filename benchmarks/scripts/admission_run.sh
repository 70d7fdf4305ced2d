#!/usr/bin/env bash
# Issue 20, the GPU half of the admission check: `pagedllm serve` on qwen3-0.6b (dummy weights) with room for
# 8 running + 8 waiting requests and a 2 s queue delay, then benchmarks/scripts/admission_load.py: the unloaded TPOT
# (one request at a time), 5 waves of 48 requests at once (3x capacity), and the gauges once the burst is over.
#   bash benchmarks/scripts/admission_run.sh            (carry .whl and .assets, as device_env.sh says)
# Writes $OUT/admission.json (read tpot_ratio / tpot_within_20pct, num_429 and retry_after_values,
# max_wait_within_delay, back_to_zero), $OUT/server.log and $OUT/metrics-after.txt. Every step is bounded: the
# script ends within about 120 s (server start 70 s at most, the load 30 s, the shutdown 10 s).
set -u
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/admission}; mkdir -p "$OUT"
PORT=8013 MAX_NUM_SEQS=8 MAX_NUM_WAITING=8 DELAY_MS=2000

python3 -m pagedllm.entrypoints.cli serve pagedllm/bench/configs/qwen3-0.6b --load-format dummy \
  --tokenizer .assets/tokenizers/qwen3 --port $PORT --max-num-seqs $MAX_NUM_SEQS --max-num-waiting $MAX_NUM_WAITING \
  --max-queue-delay-ms $DELAY_MS --disable-access-log > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 70); do curl -sf localhost:$PORT/health > /dev/null && break; sleep 1; done
grep -m2 "KV cache:\|Serving" "$OUT/server.log"

timeout 30 python3 benchmarks/scripts/admission_load.py --url http://127.0.0.1:$PORT --delay-ms $DELAY_MS \
  --capacity $((MAX_NUM_SEQS + MAX_NUM_WAITING)) --max-tokens 128 --waves 5 > "$OUT/admission.json"
STATUS=$?
curl -s localhost:$PORT/metrics > "$OUT/metrics-after.txt"

kill -TERM $SERVER
for _ in $(seq 10); do kill -0 $SERVER 2> /dev/null || break; sleep 1; done
kill -KILL $SERVER 2> /dev/null
wait $SERVER; echo "server exit code $? (0 after SIGTERM; 137: killed after 10 s)"
grep -c Traceback "$OUT/server.log"
cat "$OUT/admission.json"
exit $STATUS
