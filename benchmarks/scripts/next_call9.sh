#!/usr/bin/env bash
# Session 32's second H200 call (~540 s), after PDL went on by default (start trigger): the GPU tests with PDL on
# (and the warm-up fix), then PDL off vs on where it was never measured: offline throughput of Qwen3-0.6B (500
# requests 512/128, large batches and prefill), the Llama-3.1-8B batch-1 decode with GPTQ (W4A16 kernels, now
# with PDL) and FP8 weights, and issue 16's batch-64 FP8 vs bf16 throughput. Carry .whl and .assets; from the repo
# root:   bash benchmarks/scripts/next_call9.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next9; mkdir -p $WORK
LIMIT=${LIMIT:-480}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK .; }
bench() {  # bench PDL_MODE RECORD ARGS...: one pagedllm bench run, its log next to its record
  local mode=$1 record=$2; shift 2
  PAGEDLLM_PDL=$mode timeout ${BENCH_TIMEOUT:-110} python3 -m pagedllm.bench "$@" --output-json $WORK/$record.json \
    > $WORK/$record.log 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); keys=('decode_step_ms',
    'output_tokens_per_s'); print(sys.argv[2], {k: round(r[k], 4) for k in keys if k in r})" \
    $WORK/$record.json "$record" 2>/dev/null || { echo "$record failed"; tail -n 4 $WORK/$record.log; }
}
echo "=== GPU tests $(date +%T)"
timeout ${TESTS_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -rf tests/model/test_skinny_gemm.py \
  tests/model/quantization/test_w4a16_kernel.py tests/attention/test_triton_paged.py tests/worker/test_triton_sampling.py \
  tests/worker/test_grammar_mask_sampling.py tests/worker/test_model_runner_graph_path.py tests/entrypoints/test_gpu.py \
  tests/entrypoints/test_llm_moe.py tests/entrypoints/test_llm_kv_cache_fp8.py 2>&1 | tail -n 12
pack
echo "=== offline throughput, PDL off vs on $(date +%T)"
for repeat in 1 2; do
  for mode in 0 start; do
    [ $SECONDS -lt $LIMIT ] || break 2
    bench $mode throughput-qwen3-0.6b-500x512-128-pdl-$mode-$repeat throughput --disable-tqdm --model qwen3-0.6b \
      --workload random --input-len 512 --output-len 128 --num-prompts 500
  done
done
pack
echo "=== Llama-3.1-8B batch-1 decode, quantized, PDL off vs on $(date +%T)"
for quant in gptq fp8; do
  for mode in 0 start; do
    [ $SECONDS -lt $LIMIT ] || break 2
    bench $mode latency-llama-3.1-8b-bs1-$quant-pdl-$mode latency --model llama-3.1-8b --batch-size 1 --input-len 32 \
      --output-len 128 --num-iters-warmup 1 --num-iters 3 --quantization $quant
  done
done
pack
echo "=== Llama-3.1-8B 64 x 512/128, bf16 vs FP8 (PDL on) $(date +%T)"
for quant in none fp8; do
  [ $SECONDS -lt $LIMIT ] || break
  flag=""; [ $quant = fp8 ] && flag="--quantization fp8"
  bench start throughput-llama-3.1-8b-64x512-128-$quant throughput --disable-tqdm --model llama-3.1-8b \
    --workload random --input-len 512 --output-len 128 --num-prompts 64 --max-num-seqs 64 $flag
done
pack
echo "=== done $(date +%T) ($SECONDS s)"
