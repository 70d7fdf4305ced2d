#!/bin/bash
# Issue 17 (multi-LoRA) on one H200, one call: the LoRA GPU tests (Triton shrink/expand against the torch path, in
# CUDA graphs; engine on CUDA vs CPU), then bench throughput of the same workload with 0, 8 and 64 random rank-16
# adapters on all projections (max_loras 8: 64 adapters swap through 8 slots), Qwen3-0.6B then Llama-3.1-8B shapes
# (dummy weights). Records land in $OUT (copied to benchmarks/h200/issue17-lora/).
set -u
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/issue17}; mkdir -p "$OUT"
timeout 75 python3 -m pytest tests/lora/test_punica.py tests/lora/test_lora_gpu.py -q -p no:cacheprovider \
  --tb=short 2>&1 | tail -n 80 | tee "$OUT/gpu_tests.txt"
bench() {  # model limit num_loras
  timeout "$4" python3 -m pagedllm.bench throughput --model "$1" --limit "$2" --num-loras "$3" --max-loras 8 \
    --max-lora-rank 16 --max-cpu-loras 64 --disable-tqdm --output-json "$OUT/$1-loras$3.json" 2>&1 | grep -v "^\[bench\] " | tail -n 4
}
for n in 0 8 64; do bench qwen3-0.6b 128 "$n" 40; done
for n in 0 8; do bench llama-3.1-8b 64 "$n" 45; done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    print(f.name, round(r["output_tokens_per_s"]), "out tok/s", r.get("lora"))
PY
