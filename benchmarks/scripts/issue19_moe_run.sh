#!/usr/bin/env bash
# Issue 19, MoE on the GPU machine: `bash benchmarks/scripts/issue19_moe_run.sh SECTION...` from the repo root with
# .whl and .assets carried (see device_env.sh). Records and logs go to $OUT (default: /tmp/out).
# Sections:
#   tests      the fused MoE kernels vs the torch reference compiled (bf16, fp32) and in a CUDA graph; tiny MoE models
#              through the engine on CUDA (fused kernels in the decode graphs) vs HF in float32
#   micro      one Qwen3-30B-A3B layer's experts, routing included: the decode path (decode_moe.py) vs the grouped
#              GEMM (fused_moe.py, SiLU-and-mul in the epilogue or separate) vs the torch loop, 1..1024 tokens (decode
#              path at 1, 2, 4, 8), GB/s over the experts hit; then the decode path's launch shapes at 1 and 4 tokens
#              (moe_microbench.py)
#   latency    qwen3-30b-a3b dummy weights, batch 1, 32 in / 128 out: fused with CUDA graphs (the number the issue's
#              70%-of-roofline target reads), then fused eager, 1 iteration (SKIP_EAGER=1 skips it); torch eager
#              (PAGEDLLM_MOE_BACKEND=torch; it syncs per expert, so it cannot be graphed) only with TORCH_EAGER=1:
#              same call, same engine flags otherwise
#   profile    qwen3-30b-a3b's batch-1 decode graph replay at context 100, kernel by kernel (profile_decode_kernels.py):
#              calls and us per replay per kernel name, so kernels per layer and the time outside the experts read off
#   throughput nano workload (256 prompts): fused with graphs (SKIP_FUSED_GRAPHS=1 skips it); then NANO_SMALL prompts
#              (default 32) fused eager vs torch eager, the torch loop being too slow for the full workload in the
#              time limit
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline -1 2>/dev/null || echo "(no git)"
MODEL=qwen3-30b-a3b
COMMON="--model $MODEL --load-format dummy --gpu-memory-utilization ${GPU_UTIL:-0.9}"
bench() { timeout ${BENCH_TIMEOUT:-240} python3 -m pagedllm.bench "$@" 2>&1 | grep -v "^\[bench\]" | tail -${BENCH_TAIL:-8}; }
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
    tests)
      timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -rf tests/model/test_fused_moe.py \
        tests/entrypoints/test_llm_moe.py 2>&1 | tail -15 ;;
    micro)
      timeout ${MICRO_TIMEOUT:-150} python3 benchmarks/scripts/moe_microbench.py --output-json "$OUT/moe-microbench.json" \
        2>&1 | tail -30 ;;
    latency)
      LATENCY="--batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1"
      echo "--- latency fused, CUDA graphs"
      BENCH_TIMEOUT=${GRAPHS_TIMEOUT:-120} bench latency $COMMON $LATENCY --num-iters 3 \
        --output-json "$OUT/latency-$MODEL-bs1-fused-graphs.json"
      if [ "${SKIP_EAGER:-0}" != 1 ]; then
        echo "--- latency fused, eager (1 iteration)"
        BENCH_TIMEOUT=${EAGER_TIMEOUT:-90} bench latency $COMMON $LATENCY --enforce-eager --num-iters 1 \
          --output-json "$OUT/latency-$MODEL-bs1-fused-eager.json"
      fi
      if [ "${TORCH_EAGER:-0}" = 1 ]; then
        echo "--- latency torch, eager"
        PAGEDLLM_MOE_BACKEND=torch bench latency $COMMON $LATENCY --enforce-eager --num-iters 2 \
          --output-json "$OUT/latency-$MODEL-bs1-torch-eager.json"
      fi ;;
    profile)
      timeout ${PROFILE_TIMEOUT:-180} python3 benchmarks/scripts/profile_decode_kernels.py --model $MODEL --context 100 \
        2>&1 | grep -v "^\[" | tee "$OUT/profile-decode-kernels-$MODEL.log" | tail -70 ;;
    throughput)
      if [ "${SKIP_FUSED_GRAPHS:-0}" != 1 ]; then
        echo "--- throughput nano, fused, CUDA graphs"
        bench throughput --disable-tqdm $COMMON --workload nano --output-json "$OUT/throughput-$MODEL-nano-fused.json"
      fi
      for backend in triton torch; do
        echo "--- throughput nano x ${NANO_SMALL:-32} prompts, $backend, eager"
        PAGEDLLM_MOE_BACKEND=$backend bench throughput --disable-tqdm $COMMON --enforce-eager --workload nano \
          --limit ${NANO_SMALL:-32} --output-json "$OUT/throughput-$MODEL-nano${NANO_SMALL:-32}-$backend-eager.json"
      done ;;
  esac
done
echo "=== done $(date +%T)"
