#!/usr/bin/env bash
# Session 27, second H200 call (< 570 s):
# 1. Issue 17 after fcb4798 (shrink sums its K slices) and 2a3538b (warm-up reads every adapter): Llama-3.1-8B nano
#    (first 64) base / 8 adapters; Qwen3-0.6B random 2048 x 128/128 base / 64 adapters through 8 slots (32 requests
#    per adapter: 8 adapters' requests fill max_num_seqs 256, as the base run's batch); lora_profile.py on Llama
#    (where a LoRA step's time goes: decode / prefill, kernels vs host).
# 2. Issue 19: Qwen3-30B-A3B nano throughput, fused MoE with CUDA graphs; 16 nano prompts fused eager vs torch eager.
# 3. Issue 14: bench serve at unlimited rate (uvloop + httptools) vs offline throughput, same 500 requests, with the
#    processes' CPU while loaded.
source benchmarks/scripts/device_env.sh || exit 1
ROOT=${OUT:-/tmp/out}; mkdir -p "$ROOT/lora" "$ROOT/moe" "$ROOT/serve"
source benchmarks/scripts/lora_throughput.sh; LORA_OUT=$ROOT/lora
echo "=== lora $(date +%T)"
lora_run llama-3.1-8b nano64 60 0 --workload nano --limit 64
lora_run llama-3.1-8b nano64 75 8 --workload nano --limit 64
lora_run qwen3-0.6b random2048 50 0 --workload random --num-prompts 2048 --input-len 128 --output-len 128
lora_run qwen3-0.6b random2048 90 64 --workload random --num-prompts 2048 --input-len 128 --output-len 128
python3 benchmarks/scripts/lora_shares.py "$ROOT/lora"
timeout 100 python3 benchmarks/scripts/lora_profile.py --model llama-3.1-8b --num-requests 64 --max-tokens 32 \
  --num-loras 8 --output-json "$ROOT/lora/lora-profile-llama.json" > "$ROOT/lora/lora-profile-llama.txt" 2>&1
python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['gap'], indent=1))" \
  "$ROOT/lora/lora-profile-llama.json" 2>&1 | head -40 || tail -n 20 "$ROOT/lora/lora-profile-llama.txt"
echo "=== moe $(date +%T)"
OUT=$ROOT/moe NANO_SMALL=16 BENCH_TIMEOUT=110 BENCH_TAIL=3 bash benchmarks/scripts/issue19_moe_run.sh throughput
echo "=== serve $(date +%T)"
OUT=$ROOT/serve ROUNDS=1 SKIP_H11=1 SKIP_RATE16=1 timeout 200 bash benchmarks/scripts/serve_frontend_run.sh
cat "$ROOT"/serve/top-*.txt | head -30
tar czf "$ROOT/results.tgz" -C "$ROOT" lora moe serve && rm -rf "$ROOT/lora" "$ROOT/moe" "$ROOT/serve"
echo "=== done $(date +%T)"
