#!/usr/bin/env bash
# Issue 14, the API server's share: `bench serve` at unlimited rate against `pagedllm serve` (engine core process,
# async scheduling) on uvicorn's fast path (uvloop + httptools, dependencies since this commit) and on asyncio + h11
# (the same tree with uvloop and httptools hidden from Python), then offline `bench throughput` on the same 500
# requests (512 in / 128 out), all in one device call:
#   bash benchmarks/scripts/serve_frontend_run.sh        (carry .whl and .assets; records and logs go to $OUT)
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RANDOM512=(--workload random --input-len 512 --output-len 128 --num-prompts 500)
# Python with uvloop and httptools made unimportable: uvicorn then falls back to asyncio and h11.
HIDE_FAST='import runpy, sys; sys.modules["uvloop"] = sys.modules["httptools"] = None; sys.argv[0] = "pagedllm"; runpy.run_module("pagedllm.entrypoints.cli", run_name="__main__")'
serve() {  # serve TAG RATES LAUNCHER...: one server, bench serve at each rate, then SIGTERM
  local tag=$1 rates=$2; shift 2
  "$@" serve pagedllm/bench/configs/qwen3-0.6b --load-format dummy --tokenizer .assets/tokenizers/qwen3 \
    --port 8011 --async-scheduling > "/tmp/server-$tag.log" 2>&1 &
  local server=$!
  for _ in $(seq 150); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
  grep -m1 -i "uvloop\|asyncio\|httptools\|h11" "/tmp/server-$tag.log"
  for rate in $rates; do
    echo "--- serve $tag rate $rate"
    # CPU per process while the run is loaded (API server, engine core, bench client): is one of them saturated?
    (sleep 3; top -b -n 3 -d 1.5 -w 250 | grep -E "python|COMMAND") > "$OUT/top-$tag-rate$rate.txt" 2>&1 &
    timeout 120 python3 -m pagedllm.bench serve --disable-tqdm --base-url http://127.0.0.1:8011 "${RANDOM512[@]}" \
      --request-rate $rate --output-json "$OUT/serve-qwen3-0.6b-rate$rate-$tag.json" 2>&1 | grep -v "^\[bench\]" | tail -4
  done
  kill -TERM $server; wait $server; echo "server exit code $?"; grep -c "Traceback" "/tmp/server-$tag.log"
}
for round in $(seq ${ROUNDS:-2}); do  # alternating (ROUNDS, default 2): runs differ from call to call and within one
  serve "uvloop-httptools-$round" "inf" python3 -m pagedllm.entrypoints.cli
  [ -n "$SKIP_H11" ] || serve "asyncio-h11-$round" "inf" python3 -c "$HIDE_FAST"  # SKIP_H11=1: uvloop only
done
[ -n "$SKIP_RATE16" ] || serve uvloop-httptools-16 16 python3 -m pagedllm.entrypoints.cli
timeout 150 python3 -m pagedllm.bench throughput --disable-tqdm --model qwen3-0.6b "${RANDOM512[@]}" \
  --async-scheduling --output-json "$OUT/throughput-random512-128-qwen3-0.6b-async.json" 2>&1 | grep -v "^\[bench\]" | tail -3
python3 benchmarks/scripts/summarize_records.py "$OUT"
