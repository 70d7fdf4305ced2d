#!/usr/bin/env bash
# Session 32's last H200 call (~300 s): the GPU tests that call 2's 170 s budget may have cut, with PDL on by default
# (the engine-level GPU tests, MoE, FP8 KV cache and weights, LoRA, sliding window), each file on its own clock.
# Carry .whl and .assets; from the repo root:   bash benchmarks/scripts/next_call12.sh
source benchmarks/scripts/device_env.sh || exit 1
for file in tests/entrypoints/test_gpu.py tests/entrypoints/test_llm_moe.py tests/model/quantization/test_fp8_gemv.py \
    tests/entrypoints/test_llm_kv_cache_fp8.py tests/model/quantization/test_fp8_tma.py tests/lora/test_lora_gpu.py \
    tests/model/quantization/test_fp8_kernels.py tests/attention/test_sliding_window.py tests/lora/test_punica.py; do
  [ $SECONDS -lt ${LIMIT:-320} ] || break
  echo "=== $file $(date +%T)"
  timeout ${FILE_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider -rf -x "$file" 2>&1 | tail -n 4
done
echo "=== done $(date +%T) ($SECONDS s)"
