#!/bin/bash
# Issue 17 (multi-LoRA) on one H200, one call (< 560 s: the per-step timeouts sum to 550 s):
# 1. the LoRA GPU tests (Triton shrink/expand against the torch path, in CUDA graphs; engine on CUDA vs CPU);
# 2. benchmarks/scripts/lora_profile.py: Qwen3-0.6B, base vs 8 adapters, where the time goes (lora_profile.json,
#    read its "gap": per decode / prefill step, wall, device, kernel, LoRA-kernel and host ms, base vs LoRA);
# 3. bench throughput with random rank-16 adapters on all projections, each next to its base run (dummy weights):
#    Qwen3-0.6B nano's first 128 requests with 8 adapters; Qwen3-0.6B 2048 x 128/128 random with 64 adapters through
#    8 slots (32 requests per adapter, so 8 adapters' requests fill the base run's batch of 256); Llama-3.1-8B nano's
#    first 64 with 8 adapters. Records land in $OUT (copied to benchmarks/h200/issue17-lora/); the last lines print each run's
#    output tok/s and its fraction of the same model's base run.
set -u
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/issue17}; mkdir -p "$OUT"
timeout 70 python3 -m pytest tests/lora/test_punica.py tests/lora/test_lora_gpu.py -q -p no:cacheprovider \
  --tb=short 2>&1 | tail -n 80 | tee "$OUT/gpu_tests.txt"
timeout 60 python3 benchmarks/scripts/lora_profile.py --model qwen3-0.6b --num-requests 128 --max-tokens 32 \
  --num-loras 8 --output-json "$OUT/lora_profile.json" > "$OUT/lora_profile.txt" 2>&1
python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['gap'], indent=1))" \
  "$OUT/lora_profile.json" 2>&1 || tail -n 30 "$OUT/lora_profile.txt"
source benchmarks/scripts/lora_throughput.sh; LORA_OUT=$OUT
for n in 0 8; do lora_run qwen3-0.6b nano128 45 $n --workload nano --limit 128; done
for n in 0 64; do lora_run qwen3-0.6b random2048 90 $n --workload random --num-prompts 2048 --input-len 128 --output-len 128; done
[ -n "${SKIP_LLAMA:-}" ] || for n in 0 8; do lora_run llama-3.1-8b nano64 75 $n --workload nano --limit 64; done  # SKIP_LLAMA=1: Qwen3 only
python3 benchmarks/scripts/lora_shares.py "$OUT"
