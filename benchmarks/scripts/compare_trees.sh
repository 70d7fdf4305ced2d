#!/usr/bin/env bash
# Same-call before/after on the GPU machine: the tree under .base (the pre-change commit, `git archive` of it) and
# this tree, each through the same commands. Records and logs go to $OUT. Usage: bash benchmarks/scripts/compare_trees.sh
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$PWD
in_tree() {  # in_tree LABEL DIR COMMAND...: run with DIR's pagedllm first on the path
  local label=$1 dir=$2; shift 2
  echo "--- $label: $*"
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 240 "$@" 2>&1 | grep -v "^\[bench\]" | tail -4)
}
LAT=(python3 -m pagedllm.bench latency --batch-size 1 --input-len 32 --output-len 128)
for which in base new; do
  dir=$ROOT; [ $which = base ] && dir=$ROOT/.base
  in_tree $which "$dir" python3 "$ROOT/benchmarks/scripts/greedy_digest.py"
  in_tree $which "$dir" "${LAT[@]}" --model qwen3-0.6b --output-json "$OUT/latency-qwen3-0.6b-bs1-$which.json"
done
for which in base new; do
  dir=$ROOT; [ $which = base ] && dir=$ROOT/.base
  in_tree $which "$dir" "${LAT[@]}" --model llama-3.1-8b --output-json "$OUT/latency-llama-3.1-8b-bs1-$which.json"
  in_tree $which "$dir" python3 -m pagedllm.bench throughput --disable-tqdm --model qwen3-0.6b --workload nano \
    --output-json "$OUT/throughput-nano-qwen3-0.6b-$which.json"
done
echo "=== tests (new tree)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/attention tests/entrypoints/test_gpu.py \
  tests/model/test_triton_ops.py tests/worker 2>&1 | tail -8
echo "=== profile (new tree)"
timeout 90 python3 benchmarks/scripts/profile_host_phases.py --model qwen3-0.6b > "$OUT/profile-host-phases-after.log" 2>&1
python3 benchmarks/scripts/summarize_records.py "$OUT"
tail -32 "$OUT/profile-host-phases-after.log" | grep -E "ms|steps" | head -40
