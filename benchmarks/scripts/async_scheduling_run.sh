#!/usr/bin/env bash
# Issue 14, async scheduling: the tree under .base (the pre-change commit), this tree, and this tree with
# --async-scheduling, in one device call, for the sections given:
#   bash benchmarks/scripts/async_scheduling_run.sh tests latency-qwen3-0.6b nano latency-llama-3.1-8b   # call A
#   bash benchmarks/scripts/async_scheduling_run.sh serve offline nano-hf                                # call B
# serve: `pagedllm serve` (engine core process) with and without --async-scheduling, bench serve at 16 req/s and
# unlimited; offline: bench throughput on the same 500 requests (512 in / 128 out), with and without the flag.
# Records and logs go to $OUT.
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$PWD
run_as() {  # run_as LABEL COMMAND...: base = .base's tree, new = this tree synchronous, async = this tree async
  local label=$1 dir=$ROOT extra=(); shift; [ "$label" = base ] && dir=$ROOT/.base
  [ "$label" = new ] && extra=(--no-async-scheduling)
  [ "$label" = async ] && extra=(--async-scheduling)
  echo "--- $label: $* ${extra[*]}"
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 120 "$@" "${extra[@]}" 2>&1 | grep -v "^\[bench\]" | tail -3)
}
LAT=(python3 -m pagedllm.bench latency --batch-size 1 --input-len 32 --output-len 128 --max-num-seqs 8)
RANDOM512=(--workload random --input-len 512 --output-len 128 --num-prompts 500)
serve() {  # serve TAG [FLAGS...]: one server, bench serve at 16 req/s and unlimited, then SIGTERM
  local tag=$1; shift
  python3 -m pagedllm.entrypoints.cli serve pagedllm/bench/configs/qwen3-0.6b --load-format dummy \
    --tokenizer .assets/tokenizers/qwen3 --port 8011 "$@" > "/tmp/server-$tag.log" 2>&1 &  # (few files come back from $OUT)
  local server=$!
  for _ in $(seq 150); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
  for rate in 16 inf; do
    echo "--- serve $tag rate $rate"
    timeout 120 python3 -m pagedllm.bench serve --disable-tqdm --base-url http://127.0.0.1:8011 "${RANDOM512[@]}" \
      --request-rate $rate --output-json "$OUT/serve-qwen3-0.6b-rate$rate-$tag.json" 2>&1 | grep -v "^\[bench\]" | tail -4
  done
  kill -TERM $server; wait $server; echo "server exit code $?"; grep -c "Traceback" /tmp/server-$tag.log
}
for section in "$@"; do
  echo "=== $section"
  case $section in
    tests) timeout 200 python3 -m pytest -q -p no:cacheprovider tests/entrypoints/test_gpu.py \
        tests/model/test_skinny_gemm.py 2>&1 | tail -6 ;;
    latency-*) model=${section#latency-}
      for which in base new async; do
        run_as $which "${LAT[@]}" --model $model --output-json "$OUT/latency-$model-bs1-$which.json"
      done ;;
    nano) for which in base new async; do
        run_as $which python3 -m pagedllm.bench throughput --disable-tqdm --model qwen3-0.6b --workload nano \
          --output-json "$OUT/throughput-nano-qwen3-0.6b-$which.json"
      done ;;
    nano-hf) timeout 200 python3 -m pagedllm.bench throughput --disable-tqdm --model qwen3-0.6b --workload nano \
        --async-scheduling --compare hf-static --output-json "$OUT/throughput-nano-qwen3-0.6b-async-vs-hf-static.json" \
        2>&1 | grep -v "^\[bench\]" | tail -6 ;;
    serve) serve async --async-scheduling; serve sync --no-async-scheduling ;;
    profile) for mode in --no-async-scheduling --async-scheduling; do  # host vs GPU per step, both loops
        for shape in "--num-seqs 256 --input-len 512" "--num-seqs 1 --input-len 32 --temperature 0"; do
          echo "--- profile_steps qwen3-0.6b $shape $mode"
          timeout 150 python3 benchmarks/scripts/profile_steps.py --model qwen3-0.6b $shape $mode 2>&1 \
            | sed -n '/^{/,/^}/p' | tr -d '\n'; echo
        done
      done ;;
    offline) for which in new async; do
        run_as $which python3 -m pagedllm.bench throughput --disable-tqdm --model qwen3-0.6b "${RANDOM512[@]}" \
          --output-json "$OUT/throughput-random512-128-qwen3-0.6b-$which.json"
      done ;;
  esac
done
python3 benchmarks/scripts/summarize_records.py "$OUT"
