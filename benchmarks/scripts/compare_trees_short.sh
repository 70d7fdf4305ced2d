#!/usr/bin/env bash
# compare_trees.sh within a few minutes of device time: the tree under .base and this tree through the greedy digest,
# batch-1 latency (Qwen3-0.6B, Llama-3.1-8B; --max-num-seqs 8 so start-up captures fewer graphs: a batch-1 run
# replays the batch-1 graph either way), nano, and the GPU tests named in $TESTS, as the sections given say:
#   bash benchmarks/scripts/compare_trees_short.sh digest latency-qwen3-0.6b nano latency-llama-3.1-8b tests
# Records and logs go to $OUT.
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$PWD
in_tree() {  # in_tree LABEL COMMAND...: run with LABEL's tree (base = .base) first on the path
  local label=$1 dir=$ROOT; shift; [ "$label" = base ] && dir=$ROOT/.base
  echo "--- $label: $*"
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 100 "$@" 2>&1 | grep -v "^\[bench\]" | tail -3)
}
LAT=(python3 -m pagedllm.bench latency --batch-size 1 --input-len 32 --output-len 128 --max-num-seqs 8)
# Sections, in the order given: digest (both trees), digest-new, latency-<model>, nano, tests.
for section in "$@"; do
  case $section in
    digest) for which in base new; do in_tree $which python3 "$ROOT/benchmarks/scripts/greedy_digest.py"; done ;;
    digest-new) in_tree new python3 "$ROOT/benchmarks/scripts/greedy_digest.py" ;;
    latency-*) model=${section#latency-}
      for which in base new; do in_tree $which "${LAT[@]}" --model $model --output-json "$OUT/latency-$model-bs1-$which.json"; done ;;
    nano) for which in base new; do
        in_tree $which python3 -m pagedllm.bench throughput --disable-tqdm --model qwen3-0.6b --workload nano \
          --output-json "$OUT/throughput-nano-qwen3-0.6b-$which.json"
      done ;;
    tests) echo "=== tests (new tree): $TESTS"
      timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -6 ;;
  esac
done
python3 benchmarks/scripts/summarize_records.py "$OUT"
