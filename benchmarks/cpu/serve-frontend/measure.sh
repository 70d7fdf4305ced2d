#!/usr/bin/env bash
# Before / after on this machine, alternating runs (the machine is shared: repeat). BASE and NEW are source trees
# (e.g. `git archive <commit> | tar -x -C /tmp/base`). Records and server logs go to OUT (default /tmp/serve-frontend).
#   BASE=/tmp/base NEW=/tmp/new [REPEATS=3] [OUT=...] bash measure.sh [SECTION...]
# Sections (default all):
#   setup      the tiny model and the workloads in /tmp
#   free       `bench serve`, 300 x 512 in / 128 out, temperature 0, the model's forward free: the core's steps cheap
#              and the streams lag, as on the H200 (plus `bench throughput` offline on the same requests, per tree)
#   model      the same with the real tiny model at temperature 0.6: the core is the bottleneck, no stream lags
#   intake     500 requests of 512 ids and 1 output token: the per-request cost
#   micro      microbench.py in each tree
#   extra      NEW with httptools and uvloop importable (EXTRA=/tmp/extra, from `pip install --target`)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
PY=/work/main/.venv/bin/python
OUT=${OUT:-/tmp/serve-frontend}
REPEATS=${REPEATS:-3}
mkdir -p "$OUT"

setup() {
  [ -d /tmp/tinyqwen3 ] || OMP_NUM_THREADS=1 $PY "$HERE/build_tiny_qwen3.py" /tmp/tinyqwen3
  (cd "$NEW" && PYTHONPATH=$NEW $PY "$HERE/make_workload.py" 300 0 /tmp/workload-4096-t0.json \
    && PYTHONPATH=$NEW $PY "$HERE/make_workload.py" 300 0.6 /tmp/workload-4096.json \
    && PYTHONPATH=$NEW $PY "$HERE/make_workload.py" 500 0 /tmp/workload-intake.json 1)
}

alternate() {  # alternate SECTION WORKLOAD FREE_MODEL
  for i in $(seq "$REPEATS"); do
    for tree in base new; do
      dir=$BASE; [ $tree = new ] && dir=$NEW
      FREE_MODEL=$3 WORKLOAD=$2 bash "$HERE/run.sh" "$dir" "$1-$tree-$i" "$OUT" | tail -1
    done
  done
}

offline() {  # offline TREE LABEL: bench throughput, same requests, free model, in one process
  (cd "$1" && OMP_NUM_THREADS=1 PAGEDLLM_BENCH_FREE_MODEL=1 PYTHONPATH=$HERE/free_model:$1 $PY -m pagedllm.bench \
    throughput --model /tmp/tinyqwen3 --tokenizer /work/shared/assets/tokenizers/qwen3 --device cpu --max-num-seqs 256 \
    --workload-json /tmp/workload-4096-t0.json --disable-tqdm --output-json "$OUT/offline-free-$2.json" 2>&1 \
    | grep "pagedllm ")
}

sections=("$@")
[ $# -eq 0 ] && sections=(setup free model intake micro)
for section in "${sections[@]}"; do
  echo "=== $section"
  case $section in
    setup) setup ;;
    free) alternate free /tmp/workload-4096-t0.json 1; offline "$BASE" base; offline "$NEW" new ;;
    model) alternate model /tmp/workload-4096.json 0 ;;
    intake) alternate intake /tmp/workload-intake.json 1 ;;
    micro) for i in $(seq "$REPEATS"); do for tree in base new; do
        dir=$BASE; [ $tree = new ] && dir=$NEW
        (cd "$dir" && OMP_NUM_THREADS=1 PYTHONPATH=$dir $PY "$HERE/microbench.py" --json "$OUT/micro-$tree-$i.json" \
          | tr -d '\n ' && echo " $tree")
      done; done ;;
    extra) for i in $(seq "$REPEATS"); do
        FREE_MODEL=1 WORKLOAD=/tmp/workload-4096-t0.json bash "$HERE/run.sh" "$NEW" "free-new-$i" "$OUT/extra-off" | tail -1
        EXTRA_PATH=${EXTRA:-/tmp/extra} FREE_MODEL=1 WORKLOAD=/tmp/workload-4096-t0.json \
          bash "$HERE/run.sh" "$NEW" "free-new-httptools-uvloop-$i" "$OUT" | tail -1
      done ;;
  esac
done
