#!/usr/bin/env bash
# Session 29's third H200 call (~300 s): the serve / offline ratio of issue 14 from repeated runs, since single ~3 s
# runs spread 70-95% between calls (session 29, calls 1 and 2, 2 API servers). Carry .whl and .assets; from the
# repo root:
#   bash benchmarks/scripts/next_call3.sh
# 1. serve with 2, then 4 API servers, 4 client processes, 3 unlimited-rate runs each, and 3 offline runs.
# 2. While the call's clock allows ($SECONDS < LIMIT): Qwen3-0.6B nano throughput and batch-1 latency.
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next3; mkdir -p $WORK/api $WORK/qwen3
LIMIT=${LIMIT:-300}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK api qwen3; }
echo "=== api servers $(date +%T)"
OUT=$WORK/api COUNTS="2 4" CLIENTS=4 REPEATS=3 bash benchmarks/scripts/serve_api_servers_run.sh 2>&1 \
  | grep -v "^NVIDIA\|spawn_main\|resource_tracker\|^TPOT\|^ITL\|^E2EL" | tail -n 24
pack
if [ $SECONDS -lt $LIMIT ]; then
  echo "=== qwen3-0.6b nano, latency $(date +%T)"
  bench() { timeout 100 python3 -m pagedllm.bench "$@" 2>&1 | grep -v "^\[bench\]" | tail -3; }
  bench throughput --disable-tqdm --model qwen3-0.6b --workload nano --output-json $WORK/qwen3/throughput-nano.json
  bench latency --model qwen3-0.6b --batch-size 1 --input-len 32 --output-len 128 --num-iters 3 \
    --output-json $WORK/qwen3/latency-qwen3-0.6b-bs1.json
  pack
fi
echo "=== done $(date +%T) ($SECONDS s)"
