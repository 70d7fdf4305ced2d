#!/usr/bin/env bash
# Prepared in session 33 for the next session's first H200 call (~500 s). Built after session 33's device budget ran
# out, off until measured: the residual add and the RMSNorm after the o projection inside its skinny GEMM's epilogue
# (`skinny_gemm.gemm_add_rms_norm`, `layers.FUSE_NORM_INTO_OUTPUT`, switch `+norm_epilogue`): one launch per layer
# fewer. (1) GPU tests, each file on its own clock: the skinny GEMM (the new epilogue on the real o/down shapes, and
# the kernels the gate/up epilogue's removal restored), Triton ops, FP8 GEMV, the decode-rotary kernel, the MoE
# engine (its decoder now runs the o projection itself), and test_gpu.py's bfloat16 test session 33 did not reach;
# (2) the Qwen3-0.6B batch-1 decode graph kernel by kernel, default and with the epilogue; (3) batch-1 decode step,
# default vs +norm_epilogue, interleaved: Qwen3-0.6B twice (issue 14's 0.8 ms), Llama-3.1-8B, Qwen3-30B-A3B.
# Carry .whl and .assets; from the repo root:   bash benchmarks/scripts/next_call17.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next17; mkdir -p $WORK
LIMIT=${LIMIT:-470}
source benchmarks/scripts/device_lib.sh
echo "=== tests $(date +%T)"
tests tests-skinny-gemm.log 60 tests/model/test_skinny_gemm.py
tests tests-triton-ops.log 40 tests/model/test_triton_ops.py
tests tests-decode-rotary.log 30 tests/attention/test_decode_rotary.py
tests tests-fp8-gemv.log 40 tests/model/quantization/test_fp8_gemv.py
tests tests-moe.log 50 tests/entrypoints/test_llm_moe.py
tests tests-gpu-bf16.log 40 tests/entrypoints/test_gpu.py -k bfloat16_top1
pack
for switches in "" +norm_epilogue; do
  timeout 60 python3 benchmarks/scripts/without_decode_kernels.py "$switches" benchmarks/scripts/profile_decode_kernels.py \
    --model qwen3-0.6b --context 100 > $WORK/profile-decode-kernels-qwen3-0.6b${switches:+-norm_epilogue}.log 2>&1
  grep -A12 '"replay_bs1_ms"' $WORK/profile-decode-kernels-qwen3-0.6b${switches:+-norm_epilogue}.log | tr -d '\n'
  echo " [$switches]"
done
pack
for repeat in 1 2; do
  latency latency-qwen3-0.6b-bs1-default-$repeat "" --model qwen3-0.6b
  latency latency-qwen3-0.6b-bs1-norm_epilogue-$repeat +norm_epilogue --model qwen3-0.6b
done
latency latency-llama-3.1-8b-bs1-default "" --model llama-3.1-8b
latency latency-llama-3.1-8b-bs1-norm_epilogue +norm_epilogue --model llama-3.1-8b
latency latency-qwen3-30b-a3b-bs1-default "" --model qwen3-30b-a3b
latency latency-qwen3-30b-a3b-bs1-norm_epilogue +norm_epilogue --model qwen3-30b-a3b
pack
echo "=== done $(date +%T) ($SECONDS s)"
