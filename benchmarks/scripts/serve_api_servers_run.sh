#!/usr/bin/env bash
# Issue 14, several API server processes: `bench serve` at unlimited rate against `pagedllm serve --api-server-count N`
# (N = 1, 2, 4; engine core process, async scheduling, Qwen3-0.6B dummy weights, 500 requests 512 in / 128 out), then
# offline `bench throughput` on the same 500 requests, in one device call (~3-4 min):
#   bash benchmarks/scripts/serve_api_servers_run.sh        (carry .whl and .assets; records and logs go to $OUT)
# Prints each run's output tok/s and its ratio to offline; writes the bench records, each server's log and a
# `top -b -c` sample per run (10 s from the start of bench serve) with the pid of each process (top-N.txt, pids-N.txt:
# which of the API servers, the engine core and the bench client saturates a core).
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RANDOM512=(--workload random --input-len 512 --output-len 128 --num-prompts 500)
COUNTS=${COUNTS:-1 2 4}
CLIENTS=${CLIENTS:-4}  # bench serve client processes: one saturated a core in session 27's run (set 1 to compare)
RATE16=${RATE16:-0}    # 1: after the unlimited run of the first count, the same requests at 16 req/s (TTFT, TPOT)
REPEATS=${REPEATS:-1}  # unlimited-rate runs per server, and offline runs (one run lasts ~3 s: single runs spread)
PYSPY=${PYSPY:-0}      # 1: py-spy records the engine core during each unlimited-rate run (pyspy-core-*.raw)

bench_serve() {  # bench_serve RATE RECORD LINES: the 500 requests at RATE req/s against the running server
  timeout 120 python3 -m pagedllm.bench serve --disable-tqdm --base-url http://127.0.0.1:8011 "${RANDOM512[@]}" \
    --request-rate "$1" --num-clients "$CLIENTS" --output-json "$2" 2>&1 | grep -v "^\[bench\]" | tail -"$3"
}

suffix() { [ "$1" = 1 ] || echo "-run$1"; }  # a record's name suffix for run N (none for the first)

serve() {  # serve N: one server with N API server processes, bench serve at unlimited rate, then SIGTERM
  local count=$1 log="$OUT/server-api$1.log"
  python3 -m pagedllm.entrypoints.cli serve pagedllm/bench/configs/qwen3-0.6b --load-format dummy \
    --tokenizer .assets/tokenizers/qwen3 --port 8011 --async-scheduling --disable-log-stats \
    --api-server-count "$count" > "$log" 2>&1 &
  local server=$!
  for _ in $(seq 150); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
  sleep 2  # every API server attached (the first one up answers /health)
  { echo "parent $server"; grep -oE "Engine core process [0-9]+|API server process [0-9]+: pid [0-9]+" "$log"
    pgrep -P "$server" -a; } > "$OUT/pids-api$count.txt"
  echo "--- serve --api-server-count $count"
  top -b -c -n 10 -d 1 -w 400 > "$OUT/top-api$count.txt" 2>&1 &
  local top=$!
  local core; core=$(grep -oE "Engine core process [0-9]+" "$log" | grep -oE "[0-9]+$")
  for run in $(seq "$REPEATS"); do
    local name="api$count$(suffix "$run")" spy=""
    if [ "$PYSPY" = 1 ]; then
      py-spy record -p "$core" -r 100 -f raw --threads --nonblocking -o "$OUT/pyspy-core-$name.raw" > /dev/null 2>&1 &
      spy=$!
    fi
    bench_serve inf "$OUT/serve-qwen3-0.6b-$name.json" 4
    if [ -n "$spy" ]; then kill -INT "$spy"; wait "$spy"; fi
  done
  wait $top
  if [ "$RATE16" = 1 ] && [ "$count" = "${COUNTS%% *}" ]; then
    echo "--- 16 req/s, --api-server-count $count"
    bench_serve 16 "$OUT/serve-qwen3-0.6b-api$count-rate16.json" 6
  fi
  kill -TERM $server; wait $server; echo "server exit code $? (Tracebacks: $(grep -c Traceback "$log"))"
  # The busiest python processes of the sample's last 5 seconds (see pids-api$count.txt for who is who).
  grep -E "^ *[0-9]+ .*python" "$OUT/top-api$count.txt" | tail -n 60 | sort -k9 -nr | head -8 | cut -c1-160
}
for count in $COUNTS; do serve "$count"; done
for run in $(seq "$REPEATS"); do
  timeout 150 python3 -m pagedllm.bench throughput --disable-tqdm --model qwen3-0.6b "${RANDOM512[@]}" \
    --async-scheduling --output-json "$OUT/throughput-random512-128-qwen3-0.6b-async$(suffix "$run").json" 2>&1 \
    | grep -v "^\[bench\]" | tail -3
done
python3 - "$OUT" $COUNTS <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
offline_runs = [json.loads(p.read_text()) for p in sorted(out.glob("throughput-random512-128-qwen3-0.6b-async*.json"))]
offline = statistics.median(run["output_tokens_per_s"] for run in offline_runs)
offline_tpot_ms = 1000 * statistics.median(run["tpot"]["p50_s"] for run in offline_runs)
print(f"offline, median of {len(offline_runs)}: {offline:.0f} output tok/s, median TPOT {offline_tpot_ms:.2f} ms")
for count in sys.argv[2:]:
    first = out / f"serve-qwen3-0.6b-api{count}.json"
    for path in [first] * first.exists() + sorted(out.glob(f"serve-qwen3-0.6b-api{count}-run*.json")):
        record = json.loads(path.read_text())
        tps, metrics = record["output_tokens_per_s"], record["metrics"]
        print(f"{path.stem}: {tps:.0f} output tok/s = {tps / offline:.1%} of offline; TTFT mean "
              f"{metrics['ttft_ms']['mean']:.0f} ms, ITL mean {metrics['itl_ms']['mean']:.1f} ms, median TPOT "
              f"{metrics['tpot_ms']['median']:.2f} ms = {metrics['tpot_ms']['median'] / offline_tpot_ms:.2f}x "
              f"offline's, failed {metrics['failed']}")
EOF
python3 benchmarks/scripts/summarize_records.py "$OUT"
