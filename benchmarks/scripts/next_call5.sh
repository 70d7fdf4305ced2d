#!/usr/bin/env bash
# Session 30's second H200 call (~330 s; optional sections while $SECONDS < LIMIT). Carry .whl and .assets; from the
# repo root:   bash benchmarks/scripts/next_call5.sh
# 1. GPU tests of this session's changes: no kernel compiles inside a step after start-up (test_gpu.py), the
#    late-compile log, W4A16 act-order routes.
# 2. Issue 14: the first unlimited-rate burst after a server start, 2 API servers, after 0892e7b (sampler arrays at
#    16-byte offsets, LM head + every sampling specialization warmed up); the server log's late compiles.
# 3. Llama-3.1-8B batch-1 decode graph, kernel by kernel, bf16 then FP8 (issues 14 and 16: where 4.41 / 2.85 ms go).
# Results are packed into $OUT/results.tgz after every section.
source benchmarks/scripts/device_env.sh || exit 1
export PATH=/tmp/site/bin:$PATH
WORK=/tmp/next5; mkdir -p $WORK/tests $WORK/api $WORK/prof
LIMIT=${LIMIT:-330}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK tests api prof; }
echo "=== tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rf tests/entrypoints/test_gpu.py \
  tests/worker/test_late_compiles.py "tests/model/quantization/test_w4a16_kernel.py" -k "no_kernel_compiles or late or act_order or permut" \
  2>&1 | tee $WORK/tests/tests.log | tail -n 15
grep -h "first used after start-up" $WORK/tests/tests.log | cut -c1-600 | head -20
pack; echo "=== api servers $(date +%T)"
OUT=$WORK/api COUNTS="2" CLIENTS=4 REPEATS=2 bash benchmarks/scripts/serve_api_servers_run.sh 2>&1 \
  | grep -v "^NVIDIA\|spawn_main\|resource_tracker\|^TPOT\|^ITL\|^E2EL" | tail -n 6
LATE="first used after start-up"
echo "--- kernels $LATE (server log): $(grep -c "$LATE" $WORK/api/server-api2.log)"
grep "$LATE" $WORK/api/server-api2.log | cut -c1-700 | head -20
pack
for quant in none fp8; do
  [ $SECONDS -lt $LIMIT ] || break
  echo "=== profile llama-3.1-8b $quant $(date +%T)"
  flag=""; [ $quant = none ] || flag="--quantization $quant"
  timeout 110 python3 benchmarks/scripts/profile_decode_kernels.py --model llama-3.1-8b --context 100 $flag 2>&1 \
    | grep -v "^\[" > $WORK/prof/profile-decode-kernels-llama-3.1-8b-$quant.log
  grep -A7 '"replay_bs1_ms"' $WORK/prof/profile-decode-kernels-llama-3.1-8b-$quant.log | tr -d '\n'; echo
  sed -n '/==== bound/,$p' $WORK/prof/profile-decode-kernels-llama-3.1-8b-$quant.log | head -26
  pack
done
echo "=== done $(date +%T) ($SECONDS s)"
