#!/usr/bin/env bash
# The next H200 call (prepared in session 28, which had no device time; ~480 s; optional sections run while the
# call's clock allows, $SECONDS < LIMIT). Carry .whl and .assets; from the repo root:
#   bash benchmarks/scripts/next_call1.sh
# 1. GPU tests never run on a GPU yet: the LoRA split-K shrink (38e5d79, c10d2a5, 79480ab: the kernel test at K 700
#    and 1024, the engine CUDA-vs-CPU test at hidden 256) and the W4A16 kernels with symmetric zeros dropped at load
#    (7615d42), side by side with the FP8 TMA tests.
# 2. Issue 14: bench serve at unlimited rate, --api-server-count 1, 2 and 4, four client processes, against offline
#    on the same 500 requests (session 27 had one client process, which saturated a core); one API server at 16 req/s
#    (the TTFT / TPOT targets, last measured before the engine core process).
# 3. Issue 16: W4A16 micro with the tl.dot launch-shape sweep (sets dot_config and the dispatch constants), then
#    Llama-3.1-8B bs1 latency bf16 vs GPTQ (sym zeros dropped: unmeasured) and 64 x 512/128 throughput.
# 4. Issue 19 (if time allows): Qwen3-30B-A3B nano, fused graphs, then 16 prompts fused eager vs torch eager.
# Results are packed into $OUT/results.tgz after every section (a call cut short still returns what it finished).
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next1; mkdir -p $WORK/tests $WORK/api $WORK/w4a16 $WORK/moe
LIMIT=${LIMIT:-380}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK tests api w4a16 moe; }
echo "=== tests $(date +%T)"
t() { local name=$1; shift; timeout 200 python3 -m pytest -q -p no:cacheprovider -rf "$@" > "$WORK/tests/$name.log" 2>&1; }
W4=tests/model/quantization/test_w4a16_kernel.py
t lora tests/lora/test_punica.py tests/lora/test_lora_gpu.py &
t fp8-tma tests/model/quantization/test_fp8_tma.py &
t w4a16-oracle $W4 -k "matches_oracle or configs or dispatch or emulation or rejects or exact or leading" &
t w4a16-random $W4 -k "random_shapes" &
t w4a16-gpu $W4 -k "asm_dequantization or llama_shapes or cuda_graph" &
t quant-load tests/model/quantization -k "gptq or awq or compressed" --ignore=$W4 &
wait
for f in $WORK/tests/*.log; do echo "$(basename $f .log): $(tail -n 1 $f)"; grep -h "^FAILED" "$f" | head -5; done
pack; echo "=== api servers $(date +%T)"
OUT=$WORK/api COUNTS="1 2 4" CLIENTS=4 RATE16=1 bash benchmarks/scripts/serve_api_servers_run.sh 2>&1 | grep -v "^NVIDIA" | tail -n 30
pack; echo "=== w4a16 micro sweep, latency, throughput $(date +%T)"
OUT=$WORK/w4a16 MICRO_FLAGS=--sweep LATENCY_MODES="bf16 gptq" LATENCY_ITERS=3 THROUGHPUT_MODES="bf16 gptq" BENCH_TAIL=2 \
  bash benchmarks/scripts/issue16_w4a16_run.sh micro latency throughput 2>&1 | grep -v "^NVIDIA\|^bffb" | tail -n 60
pack
if [ $SECONDS -lt $LIMIT ]; then
  echo "=== moe $(date +%T)"
  OUT=$WORK/moe NANO_SMALL=16 bash benchmarks/scripts/issue19_moe_run.sh throughput 2>&1 | grep -v "^NVIDIA" | tail -n 20
  pack
fi
echo "=== done $(date +%T) ($SECONDS s)"
