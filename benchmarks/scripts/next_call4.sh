#!/usr/bin/env bash
# The next H200 call (prepared in session 29; ~150 s): where the first burst after a server start loses its time.
# Session 29 measured the first unlimited-rate burst after a start at 70% of offline (2 API servers) and the next
# ones at 102-106% (benchmarks/h200/session29/call3); on the CPU harness the first burst is not slower, so the cost
# is on the GPU side. The engine now logs each Triton kernel first used after start-up (worker/late_compiles.py),
# and py-spy (a carried wheel) samples the engine core during each burst: first against second.
# Carry .whl and .assets; from the repo root:
#   bash benchmarks/scripts/next_call4.sh
source benchmarks/scripts/device_env.sh || exit 1
export PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}
OUT=$OUT COUNTS="2" CLIENTS=4 REPEATS=3 PYSPY=1 bash benchmarks/scripts/serve_api_servers_run.sh 2>&1 \
  | grep -v "^NVIDIA\|spawn_main\|resource_tracker\|^TPOT\|^ITL\|^E2EL" | tail -n 12
echo "=== kernels first used after start-up (server log)"
grep -c "first used after start-up" "$OUT/server-api2.log"
grep "first used after start-up" "$OUT/server-api2.log" | cut -c1-300 | head -30
for run in api2 api2-run2; do
  echo "=== engine core, burst $run"
  python3 benchmarks/cpu/serve-frontend/pyspy_summary.py "$OUT/pyspy-core-$run.raw" 0.04 2>&1 | head -40
done
