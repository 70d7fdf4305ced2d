#!/usr/bin/env bash
# Session 27, third H200 call (< 580 s): correctness of the new kernels first, then the figures.
# 1. Issue 17 after 872cb7a / e9ab1f0 (shrink: <= 8 K slices, 4 partial loads at a time; expand loads y first):
#    Llama-3.1-8B nano (first 64) base / 8 adapters; Qwen3-0.6B random 2048 x 128/128 base / 64 adapters.
# 2. Issue 16: the FP8 GPU tests (incl. the TMA W8A8 GEMM, dbc31f3, first run on a GPU) and the W4A16 kernel tests
#    (inline-asm dequantization, 93b148c / 9b7340a, first run on a GPU); the TMA launch-shape table at M 16..256;
#    Llama-3.1-8B 64 x 512/128 bf16 vs fp8 throughput.
source benchmarks/scripts/device_env.sh || exit 1
ROOT=${OUT:-/tmp/out}; mkdir -p "$ROOT/lora" "$ROOT/fp8" "$ROOT/w4a16"
source benchmarks/scripts/lora_throughput.sh; LORA_OUT=$ROOT/lora
echo "=== lora $(date +%T)"
lora_run llama-3.1-8b nano64 50 0 --workload nano --limit 64
lora_run llama-3.1-8b nano64 60 8 --workload nano --limit 64
lora_run qwen3-0.6b random2048 40 0 --workload random --num-prompts 2048 --input-len 128 --output-len 128
lora_run qwen3-0.6b random2048 60 64 --workload random --num-prompts 2048 --input-len 128 --output-len 128
python3 benchmarks/scripts/lora_shares.py "$ROOT/lora"
echo "=== w4a16 tests $(date +%T)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -rf tests/model/quantization/test_w4a16_kernel.py 2>&1 \
  | tee "$ROOT/w4a16/tests.log" | tail -8
OUT=$ROOT/fp8 TESTS_TIMEOUT=110 MICRO_TIMEOUT=130 BENCH_TIMEOUT=75 MICRO_FLAGS="--tma --skip-main" MICRO_TAIL=60 \
  THROUGHPUT_MODES="bf16 fp8" bash benchmarks/scripts/issue16_fp8_run.sh tests micro throughput 2>&1 | tee "$ROOT/fp8/run.log"
tar czf "$ROOT/results.tgz" -C "$ROOT" lora fp8 w4a16 && rm -rf "$ROOT/lora" "$ROOT/fp8" "$ROOT/w4a16"
echo "=== done $(date +%T)"
