# Helpers for the device-call scripts (source after device_env.sh, with WORK set; LIMIT: the latency runs' budget).
#   pack                                 archive $WORK as $OUT/results.tgz (call after each phase: a cut call keeps it)
#   tests LOG SECONDS PYTEST_ARGS...     one pytest run on its own clock, its summary line and FAILED count
#   latency RECORD SWITCHES BENCH_ARGS...  one batch-1 `bench latency` (32 in / 128 out) with
#                                        without_decode_kernels.py's SWITCHES, skipped once $SECONDS passes LIMIT
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C "$WORK" .; }
tests() {
  local log=$1 seconds=$2; shift 2
  timeout "$seconds" python3 -m pytest -q -p no:cacheprovider -rf "$@" > "$WORK/$log" 2>&1
  echo "$log: $(grep -E "passed|failed" "$WORK/$log" | tail -n 1) $(grep -c "^FAILED" "$WORK/$log") FAILED lines"
}
latency() {
  local record=$1 switches=$2; shift 2
  [ "$SECONDS" -lt "${LIMIT:-450}" ] || return 0
  timeout 90 python3 benchmarks/scripts/without_decode_kernels.py "$switches" -m pagedllm.bench latency "$@" \
    --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
    --output-json "$WORK/$record.json" > "$WORK/$record.log" 2>&1
  grep "decode step" "$WORK/$record.log" | sed "s/^/$record: /" || tail -n 3 "$WORK/$record.log"
}
