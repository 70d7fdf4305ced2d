#!/usr/bin/env bash
# One measurement of the API server's cost: start `pagedllm serve` from TREE on the tiny model, replay WORKLOAD with
# `bench serve` at unlimited rate, and add to the bench record what the server's processes spent during the replay:
# CPU seconds of the API server (user, system, per thread), of the engine core (from /proc) and of the client, and
# the CPU seconds of the server processes' garbage collections (free_model/sitecustomize.py).
#   [FREE_MODEL=1] [WORKLOAD=FILE] bash run.sh TREE LABEL OUT_DIR [PROFILE]
# FREE_MODEL=1: the model's forward is an embedding lookup, the core's steps cheap (free_model/sitecustomize.py).
# PIN=1: the API server's threads on CPU 0, the engine core and the client on CPU 1.
# EXTRA_PATH=DIR: put DIR first on the server's PYTHONPATH (e.g. httptools and uvloop installed with pip --target).
# PROFILE=1: also py-spy the API server (raw stacks in OUT_DIR, see pyspy_summary.py).
# Needs /tmp/tinyqwen3 (build_tiny_qwen3.py) and WORKLOAD (make_workload.py; default /tmp/workload-4096.json).
set -u
TREE=$1 LABEL=$2 OUT=$3 PROFILE=${4:-0}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=/work/main/.venv/bin/python
PORT=${PORT:-8031}
WORKLOAD=${WORKLOAD:-/tmp/workload-4096.json}
mkdir -p "$OUT"
cpu_s() { awk '{print $14 / 100 "," $15 / 100}' "/proc/$1/stat"; }  # user,system seconds
threads_cpu() {  # tid, name, CPU ticks, context switches of each API server thread
  for t in /proc/$SERVER/task/*; do
    echo "$(basename $t) $(cat $t/comm) $(awk '{print $14 + $15}' $t/stat) $(awk '/ctxt_switches/ {n += $2} END {print n}' $t/status)"
  done | sort
}

cd "$TREE"
OMP_NUM_THREADS=1 PAGEDLLM_BENCH_FREE_MODEL=${FREE_MODEL:-0} PAGEDLLM_BENCH_GC_LOG=1 PYTHONPATH=${EXTRA_PATH:+$EXTRA_PATH:}$HERE/free_model:$TREE \
  $PY -m pagedllm.entrypoints.cli serve /tmp/tinyqwen3 --device cpu --tokenizer /work/shared/assets/tokenizers/qwen3 \
  --port $PORT --max-num-seqs 256 > "$OUT/server-$LABEL.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do curl -sf localhost:$PORT/health > /dev/null && break; sleep 1; done
CORE=$(pgrep -P $SERVER -f spawn_main)
CLIENT_CPUS=""
if [ "${PIN:-0}" = 1 ]; then  # the API server alone on CPU 0 (as on a GPU host, where it has a core to itself)
  taskset -a -p -c 0 $SERVER > /dev/null; taskset -a -p -c 1 $CORE > /dev/null; CLIENT_CPUS="taskset -c 1"
fi

kill -USR2 $SERVER $CORE; sleep 0.5  # garbage collection totals so far, into the server log
api0=$(cpu_s $SERVER) core0=$(cpu_s $CORE)
threads_cpu > "$OUT/threads0-$LABEL.txt"
if [ "$PROFILE" = 1 ]; then
  /work/main/.venv/bin/py-spy record -p $SERVER -r 100 -f raw -o "$OUT/pyspy-api-$LABEL.raw" --threads --nonblocking \
    > /dev/null 2>&1 &
  SPY=$!
fi
TIMEFORMAT="%U %S"  # the client's own CPU: on a 2-core machine it competes with the server
{ time OMP_NUM_THREADS=1 PYTHONPATH=$TREE $CLIENT_CPUS $PY -m pagedllm.bench serve --disable-tqdm --base-url http://127.0.0.1:$PORT \
  --workload-json "$WORKLOAD" --request-rate inf --output-json "$OUT/serve-$LABEL.json" > "$OUT/bench-$LABEL.txt" 2>&1 ; } \
  2> "$OUT/client-cpu-$LABEL.txt"
api1=$(cpu_s $SERVER) core1=$(cpu_s $CORE)
threads_cpu > "$OUT/threads1-$LABEL.txt"
kill -USR2 $SERVER $CORE; sleep 0.5
[ "$PROFILE" = 1 ] && kill -INT $SPY && wait $SPY
kill -TERM $SERVER; wait $SERVER

$PY "$HERE/add_process_cpu.py" "$OUT/serve-$LABEL.json" "$OUT/server-$LABEL.log" "$OUT/threads0-$LABEL.txt" \
  "$OUT/threads1-$LABEL.txt" $SERVER $CORE "$api0" "$api1" "$core0" "$core1" "$(cat "$OUT/client-cpu-$LABEL.txt")"
