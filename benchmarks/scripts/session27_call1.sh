#!/usr/bin/env bash
# Session 27, first H200 call (one call, < 560 s): measurements of what is built, no new kernels.
# 1. Issue 17: multi-LoRA throughput, same call: Qwen3-0.6B nano (first 128 requests) base / 8 adapters; Qwen3-0.6B
#    random 1024 x 128/128 base / 64 adapters through 8 slots (16 requests per adapter: with nano's 128 requests an
#    adapter has only 2, so max_loras=8 caps the batch at 16 requests whatever the kernels do); Llama-3.1-8B nano
#    (first 64) base / 8 adapters. Dummy weights, rank 16 on all projections.
# 2. Issue 19: Qwen3-30B-A3B bs1 latency (CUDA graphs, MAX_PAIRS 64) and the decode graph's kernel profile, with the
#    FP8 kernel tests (issue 16, -x: name the one failure of session 26) running beside them in the background.
source benchmarks/scripts/device_env.sh || exit 1
ROOT=${OUT:-/tmp/out}; mkdir -p "$ROOT/lora" "$ROOT/moe"
lora() {  # model tag timeout num_loras workload-args...
  local model=$1 tag=$2 limit=$3 n=$4; shift 4
  timeout "$limit" python3 -m pagedllm.bench throughput --model "$model" --num-loras "$n" --max-loras 8 \
    --max-lora-rank 16 --max-cpu-loras 64 --disable-tqdm "$@" --output-json "$ROOT/lora/$model-$tag-loras$n.json" \
    2>&1 | grep -v "^\[bench\] " | tail -n 3
}
echo "=== lora $(date +%T)"
lora qwen3-0.6b nano128 45 0 --workload nano --limit 128
lora qwen3-0.6b nano128 45 8 --workload nano --limit 128
lora qwen3-0.6b random1024 60 0 --workload random --num-prompts 1024 --input-len 128 --output-len 128
lora qwen3-0.6b random1024 120 64 --workload random --num-prompts 1024 --input-len 128 --output-len 128
lora llama-3.1-8b nano64 75 0 --workload nano --limit 64
lora llama-3.1-8b nano64 90 8 --workload nano --limit 64
python3 - "$ROOT/lora" <<'PY'
import json, pathlib, sys
records = {f.stem: json.loads(f.read_text()) for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
for name, r in records.items():
    base = records.get(name.rsplit("-loras", 1)[0] + "-loras0")
    share = f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.1%} of base" if base else ""
    print(name, round(r["output_tokens_per_s"]), "out tok/s", share)
PY
echo "=== moe $(date +%T)"
(timeout 300 python3 -m pytest -x -q -p no:cacheprovider -rf tests/model/quantization/test_fp8_kernels.py \
  tests/model/quantization/test_fp8_gemv.py > "$ROOT/fp8-tests.log" 2>&1) &
OUT=$ROOT/moe SKIP_EAGER=1 GRAPHS_TIMEOUT=90 PROFILE_TIMEOUT=120 bash benchmarks/scripts/issue19_moe_run.sh latency profile
wait
tail -n 25 "$ROOT/fp8-tests.log"
echo "=== done $(date +%T)"
tar czf "$ROOT/results.tgz" -C "$ROOT" lora moe fp8-tests.log && rm -rf "$ROOT/lora" "$ROOT/moe" "$ROOT/fp8-tests.log"
