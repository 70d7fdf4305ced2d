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
source benchmarks/scripts/lora_throughput.sh; LORA_OUT=$ROOT/lora
echo "=== lora $(date +%T)"
lora_run qwen3-0.6b nano128 45 0 --workload nano --limit 128
lora_run qwen3-0.6b nano128 45 8 --workload nano --limit 128
lora_run qwen3-0.6b random1024 60 0 --workload random --num-prompts 1024 --input-len 128 --output-len 128
lora_run qwen3-0.6b random1024 120 64 --workload random --num-prompts 1024 --input-len 128 --output-len 128
lora_run llama-3.1-8b nano64 75 0 --workload nano --limit 64
lora_run llama-3.1-8b nano64 90 8 --workload nano --limit 64
python3 benchmarks/scripts/lora_shares.py "$ROOT/lora"
echo "=== moe $(date +%T)"
(timeout 300 python3 -m pytest -x -q -p no:cacheprovider -rf tests/model/quantization/test_fp8_kernels.py \
  tests/model/quantization/test_fp8_gemv.py > "$ROOT/fp8-tests.log" 2>&1) &
OUT=$ROOT/moe SKIP_EAGER=1 GRAPHS_TIMEOUT=90 PROFILE_TIMEOUT=120 bash benchmarks/scripts/issue19_moe_run.sh latency profile
wait
tail -n 25 "$ROOT/fp8-tests.log"
echo "=== done $(date +%T)"
tar czf "$ROOT/results.tgz" -C "$ROOT" lora moe fp8-tests.log && rm -rf "$ROOT/lora" "$ROOT/moe" "$ROOT/fp8-tests.log"
