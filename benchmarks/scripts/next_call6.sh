#!/usr/bin/env bash
# Session 30's third H200 call (~400 s): issue 16's FP8 batch-1 decode with the RMSNorm and SiLU-and-mul inside the
# one-row FP8 GEMV (fp8_gemm.FUSE_INPUT_INTO_GEMV). Carry .whl and .assets; from the repo root:
#   bash benchmarks/scripts/next_call6.sh
# 1. test_fp8_gemv.py compiled (the fused GEMVs on Llama-3.1-8B's shapes among them);
# 2. fp8_microbench.py --fused-input --sweep gemv --skip-main: op + GEMV vs the fused GEMV per projection at one row,
#    and the GEMV's launch shapes at 1 and 4 rows (its choose_config was never tuned);
# 3. bench latency Llama-3.1-8B bs1 32/128: bf16, fp8 (fused, the default), fp8 with FUSE_INPUT_INTO_GEMV=0;
# 4. the FP8 decode graph, kernel by kernel.
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next6; mkdir -p $WORK/fp8
LIMIT=${LIMIT:-420}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK fp8; }
echo "=== tests $(date +%T)"
timeout 100 python3 -m pytest -q -p no:cacheprovider -rf tests/model/quantization/test_fp8_gemv.py 2>&1 \
  | tee $WORK/fp8/tests.log | tail -n 8
pack
OUT=$WORK/fp8 MICRO_TIMEOUT=150 MICRO_FLAGS="--fused-input --sweep gemv --skip-main" MICRO_TAIL=40 \
  bash benchmarks/scripts/issue16_fp8_run.sh micro 2>&1 | grep -v "^NVIDIA\|^{" | tail -n 40
pack
OUT=$WORK/fp8 BENCH_TIMEOUT=80 LATENCY_ITERS=3 LATENCY_MODES="bf16 fp8 fp8:FUSE_INPUT_INTO_GEMV=0" \
  bash benchmarks/scripts/issue16_fp8_run.sh latency 2>&1 | grep -v "^NVIDIA" | grep "decode step\|latency\|rror" | tail -n 12
pack
if [ $SECONDS -lt $LIMIT ]; then
  echo "=== profile llama-3.1-8b fp8 $(date +%T)"
  timeout 90 python3 benchmarks/scripts/profile_decode_kernels.py --model llama-3.1-8b --context 100 \
    --quantization fp8 2>&1 | grep -v "^\[" > $WORK/fp8/profile-decode-kernels-llama-3.1-8b-fp8.log
  grep -A7 '"replay_bs1_ms"' $WORK/fp8/profile-decode-kernels-llama-3.1-8b-fp8.log | tr -d '\n'; echo
  sed -n '/==== bound/,$p' $WORK/fp8/profile-decode-kernels-llama-3.1-8b-fp8.log | head -14
  pack
fi
echo "=== done $(date +%T) ($SECONDS s)"
