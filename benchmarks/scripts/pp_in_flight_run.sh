#!/usr/bin/env bash
# Issue 18 item 2 on 2 GPUs: pp=2 with one step in flight per stage against one step at a time, and tp=1 for scale
# (benchmarks/scripts/pp_in_flight.py: Llama-3.1-8B config, dummy weights, 64 requests of 512 in / 64 out, eager).
# From the repo root (carry .whl, as device_env.sh says):
#   bash benchmarks/scripts/pp_in_flight_run.sh
# Prints one JSON line per run and speedup_in_flight; writes $OUT/pp_in_flight.json. Arguments go to the script.
set -u
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/pp-in-flight}; mkdir -p "$OUT"; export OUT
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
timeout 300 python3 benchmarks/scripts/pp_in_flight.py "$@" > "$OUT/pp_in_flight.log" 2>&1
echo "exit code $?"
grep -v " INFO " "$OUT/pp_in_flight.log" | tail -12
