#!/usr/bin/env bash
# Issue 16, FP8 KV cache on the GPU machine: `bash benchmarks/scripts/issue16_kv_fp8_run.sh SECTION...` from the repo
# root with .whl and .assets carried (see device_env.sh). Records and logs go to $OUT (default: /tmp/out).
# Sections: tests (the FP8 cache kernels vs the torch oracle, compiled; the float-cache kernel tests they changed;
# CUDA graphs / swap / agreement end to end), nano (bench throughput --workload nano, Qwen3-0.6B dummy weights,
# --kv-cache-dtype auto then fp8 at the same gpu_memory_utilization: throughput and KV tokens of each).
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
echo "commit ${COMMIT:-unknown}"
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
    tests)
      timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -rfEs tests/attention/test_kv_cache_fp8.py \
        tests/attention/test_triton_paged_fp8.py tests/model/test_triton_ops_fp8.py \
        tests/entrypoints/test_llm_kv_cache_fp8.py tests/attention/test_triton_paged.py tests/model/test_triton_ops.py \
        2>&1 | grep -E "^(FAILED|ERROR|SKIPPED)|^E  |passed|failed" | tail -40 ;;
    nano)
      for dtype in ${NANO_DTYPES:-auto fp8}; do
        echo "--- kv-cache-dtype $dtype"
        timeout ${NANO_TIMEOUT:-100} python3 -m pagedllm.bench throughput --disable-tqdm --model qwen3-0.6b \
          --workload nano --kv-cache-dtype $dtype --output-json "$OUT/throughput-nano-qwen3-0.6b-kv-$dtype.json" \
          2>&1 | grep -v "^\[bench\]" | tail -6
        python3 -c "import json, sys; r = json.load(open(sys.argv[1])); s = r['startup']; print('kv', s['kv_cache_dtype'], \
s['kv_cache_tokens'], 'tokens,', s['num_gpu_blocks'], 'blocks; output tok/s', round(r['output_tokens_per_s']))" \
          "$OUT/throughput-nano-qwen3-0.6b-kv-$dtype.json"
      done ;;
  esac
done
echo "=== done $(date +%T)"
