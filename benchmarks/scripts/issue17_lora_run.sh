#!/bin/bash
# Issue 17 (multi-LoRA) on one H200, one call (< 300 s: the per-step timeouts sum to 290 s):
# 1. the LoRA GPU tests (Triton shrink/expand against the torch path, in CUDA graphs; engine on CUDA vs CPU);
# 2. benchmarks/scripts/lora_profile.py: Qwen3-0.6B, base vs 8 adapters, where the time goes (lora_profile.json,
#    read its "gap": per decode / prefill step, wall, device, kernel, LoRA-kernel and host ms, base vs LoRA);
# 3. bench throughput of the same workload with 0, 8 and 64 random rank-16 adapters on all projections (max_loras 8:
#    64 adapters swap through 8 slots), Qwen3-0.6B (nano, first 128 requests) then Llama-3.1-8B (first 32), dummy
#    weights. Records land in $OUT (copied to benchmarks/h200/issue17-lora/); the last lines print each run's
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
bench() {  # model limit num_loras timeout
  timeout "$4" python3 -m pagedllm.bench throughput --model "$1" --limit "$2" --num-loras "$3" --max-loras 8 \
    --max-lora-rank 16 --max-cpu-loras 64 --disable-tqdm --output-json "$OUT/$1-loras$3.json" 2>&1 | grep -v "^\[bench\] " | tail -n 4
}
bench qwen3-0.6b 128 0 30; bench qwen3-0.6b 128 8 30; bench qwen3-0.6b 128 64 40
[ -n "${SKIP_LLAMA:-}" ] || { bench llama-3.1-8b 32 0 30; bench llama-3.1-8b 32 8 30; }  # SKIP_LLAMA=1: Qwen3 only
python3 - "$OUT" <<'PY'
import json, pathlib, sys
records = {f.stem: json.loads(f.read_text()) for f in sorted(pathlib.Path(sys.argv[1]).glob("*-loras*.json"))}
for name, r in records.items():
    base = records.get(name.rsplit("-loras", 1)[0] + "-loras0")
    share = f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.0%} of base" if base else ""
    print(name, round(r["output_tokens_per_s"]), "out tok/s", share, r.get("lora"))
PY
