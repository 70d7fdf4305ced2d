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
lora() {  # model tag timeout num_loras workload-args...
  local model=$1 tag=$2 limit=$3 n=$4; shift 4
  timeout "$limit" python3 -m pagedllm.bench throughput --model "$model" --num-loras "$n" --max-loras 8 \
    --max-lora-rank 16 --max-cpu-loras 64 --disable-tqdm "$@" --output-json "$ROOT/lora/$model-$tag-loras$n.json" \
    2>&1 | grep -v "^\[bench\] " | tail -n 2
}
echo "=== lora $(date +%T)"
lora llama-3.1-8b nano64 60 0 --workload nano --limit 64
lora llama-3.1-8b nano64 75 8 --workload nano --limit 64
lora qwen3-0.6b random2048 50 0 --workload random --num-prompts 2048 --input-len 128 --output-len 128
lora qwen3-0.6b random2048 90 64 --workload random --num-prompts 2048 --input-len 128 --output-len 128
python3 - "$ROOT/lora" <<'PY'
import json, pathlib, sys
records = {f.stem: json.loads(f.read_text()) for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
for name, r in records.items():
    base = records.get(name.rsplit("-loras", 1)[0] + "-loras0")
    share = f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.1%} of base" if base else ""
    print(name, round(r["output_tokens_per_s"]), "out tok/s", share, "ttft mean", round(r["ttft"]["mean_s"] * 1000), "ms")
PY
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
