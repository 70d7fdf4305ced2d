#!/usr/bin/env bash
# The next H200 call (prepared in session 29; ~480 s, optional sections while $SECONDS < LIMIT). Carry .whl (with
# py-spy, see device_env.sh) and .assets; from the repo root:
#   bash benchmarks/scripts/next_call4.sh
# 1. Issue 14, where the first burst after a server start loses its time. Session 29 measured the first
#    unlimited-rate burst at 70% of offline (2 API servers) and the next ones at 102-106%
#    (benchmarks/h200/session29/call3); on the CPU harness the first burst is not slower, so the cost is on the GPU
#    side. The engine logs each Triton kernel first used after start-up (worker/late_compiles.py), and py-spy samples
#    the engine core during each burst: the first against the second.
# 2. Issue 16: the W4A16 sweep around dot_config's (64, 4, 3), the dispatch at 384 and 512 rows, act-order x gathered
#    in the kernel vs permuted first (PERMUTE_X_FIRST), then Llama-3.1-8B bs1 latency bf16 vs gptq.
# 3. Issue 19: Qwen3-30B-A3B bs1 latency with graphs (the 70%-of-roofline target; last at 46.6%),
#    then nano throughput fused with graphs and 4 nano prompts fused eager vs torch eager, same call.
# Results are packed into $OUT/results.tgz after every section.
source benchmarks/scripts/device_env.sh || exit 1
export PATH=/tmp/site/bin:$PATH
WORK=/tmp/next4; mkdir -p $WORK/api $WORK/w4a16 $WORK/moe $WORK/prof
LIMIT=${LIMIT:-420}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK api w4a16 moe prof; }
echo "=== api servers $(date +%T)"
OUT=$WORK/api COUNTS="2" CLIENTS=4 REPEATS=2 PYSPY=1 bash benchmarks/scripts/serve_api_servers_run.sh 2>&1 \
  | grep -v "^NVIDIA\|spawn_main\|resource_tracker\|^TPOT\|^ITL\|^E2EL" | tail -n 10
LATE="first used after start-up"
echo "--- kernels $LATE (server log): $(grep -c "$LATE" $WORK/api/server-api2.log)"
grep "$LATE" $WORK/api/server-api2.log | cut -c1-260 | head -30
for run in api2 api2-run2; do
  echo "--- engine core, burst $run"
  python3 benchmarks/cpu/serve-frontend/pyspy_summary.py "$WORK/api/pyspy-core-$run.raw" 0.04 2>&1 | head -30
done
pack; echo "=== w4a16 $(date +%T)"
OUT=$WORK/w4a16 MICRO_FLAGS="--sweep --act-order" LATENCY_MODES="bf16 gptq" LATENCY_ITERS=3 BENCH_TAIL=2 \
  bash benchmarks/scripts/issue16_w4a16_run.sh micro latency 2>&1 | grep -v "^NVIDIA" | tail -n 40
pack
if [ $SECONDS -lt $LIMIT ]; then
  echo "=== moe $(date +%T)"
  OUT=$WORK/moe SKIP_EAGER=1 GRAPHS_TIMEOUT=150 bash benchmarks/scripts/issue19_moe_run.sh latency 2>&1 \
    | grep -v "^NVIDIA" | tail -n 6
  pack
  OUT=$WORK/moe NANO_SMALL=4 BENCH_TIMEOUT=150 bash benchmarks/scripts/issue19_moe_run.sh throughput 2>&1 \
    | grep -v "^NVIDIA" | tail -n 20
  pack
fi
if [ $SECONDS -lt $((LIMIT + 60)) ]; then  # 4. Llama-3.1-8B bs1 decode graph, kernel by kernel (issue 14's 4.2 ms)
  echo "=== profile llama $(date +%T)"
  timeout 100 python3 benchmarks/scripts/profile_decode_kernels.py --model llama-3.1-8b --context 100 2>&1 \
    | grep -v "^\[" > $WORK/prof/profile-decode-kernels-llama-3.1-8b.log; tail -n 45 $WORK/prof/profile-decode-kernels-llama-3.1-8b.log
  pack
fi
echo "=== done $(date +%T) ($SECONDS s)"
