#!/usr/bin/env bash
# Session 27, fourth H200 call (~450 s; the optional sections run while the call's clock allows, $SECONDS < LIMIT).
# 1. GPU tests of this session's new default paths, five pytest processes side by side (the compiles are host work,
#    16 cores): the LoRA kernels and engine (872cb7a, e9ab1f0), the FP8 TMA GEMM file, the W4A16 kernels (inline-asm
#    dequantization, one dot per group segment, 0f36e11) in three parts.
# 2. Issue 16, Llama-3.1-8B, same call: bs1 32/128 decode step bf16 vs GPTQ W4A16 (dispatch: GEMV at 1 row, the
#    tl.dot kernel to 128 rows).
# 3. Issue 14: bench serve at unlimited rate with --api-server-count 1 and 2 vs offline, same 500 requests.
# 4. Issue 16: 64 x 512/128 throughput bf16 vs GPTQ. Then, if time allows: issue 17 Qwen3-0.6B nano first 128 base /
#    8 adapters on the final LoRA kernels; nano on Qwen3-0.6B this tree vs 37ef106 (.base), the check owed since
#    session 26.
# Results are packed into $OUT/results.tgz after every section (a call cut short still returns what it finished).
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/session27; mkdir -p $WORK/tests $WORK/w4a16 $WORK/api $WORK/lora $WORK/regress
LIMIT=${LIMIT:-330}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK tests w4a16 api lora regress; }
echo "=== tests $(date +%T)"
t() { local name=$1; shift; timeout 200 python3 -m pytest -q -p no:cacheprovider -rf "$@" > "$WORK/tests/$name.log" 2>&1; }
W4=tests/model/quantization/test_w4a16_kernel.py
t lora tests/lora/test_punica.py tests/lora/test_lora_gpu.py &
t fp8-tma tests/model/quantization/test_fp8_tma.py &
t w4a16-oracle $W4 -k "matches_oracle or configs or dispatch or emulation or rejects or exact or leading" &
t w4a16-random $W4 -k "random_shapes" &
t w4a16-gpu $W4 -k "asm_dequantization or llama_shapes or cuda_graph" &
wait
for f in $WORK/tests/*.log; do echo "$(basename $f .log): $(tail -n 1 $f)"; grep -h "^FAILED" "$f" | head -5; done
pack; echo "=== w4a16 latency $(date +%T)"
OUT=$WORK/w4a16 LATENCY_MODES="bf16 gptq" LATENCY_ITERS=3 BENCH_TAIL=2 \
  bash benchmarks/scripts/issue16_w4a16_run.sh latency 2>&1 | grep -v "^NVIDIA\|^bffb"
pack; echo "=== api servers $(date +%T)"
OUT=$WORK/api COUNTS="1 2" bash benchmarks/scripts/serve_api_servers_run.sh 2>&1 | grep -v "^NVIDIA" | tail -n 30
pack; echo "=== w4a16 throughput $(date +%T)"
OUT=$WORK/w4a16 THROUGHPUT_MODES="bf16 gptq" BENCH_TAIL=2 \
  bash benchmarks/scripts/issue16_w4a16_run.sh throughput 2>&1 | grep -v "^NVIDIA\|^bffb"
pack
if [ $SECONDS -lt $LIMIT ]; then
  echo "=== lora $(date +%T)"
  source benchmarks/scripts/lora_throughput.sh; LORA_OUT=$WORK/lora
  for n in 0 8; do lora_run qwen3-0.6b nano128 45 $n --workload nano --limit 128; done
  python3 benchmarks/scripts/lora_shares.py $WORK/lora; pack
fi
if [ $SECONDS -lt $((LIMIT + 60)) ]; then
  echo "=== regress $(date +%T)"
  OUT=$WORK/regress bash benchmarks/scripts/compare_trees_short.sh nano 2>&1 | grep -v "^NVIDIA"; pack
fi
echo "=== done $(date +%T) ($SECONDS s)"
