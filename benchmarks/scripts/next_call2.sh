#!/usr/bin/env bash
# Session 29's second H200 call (~420 s, then issue 19 while the call's clock allows, $SECONDS < LIMIT). Carry .whl,
# .assets and .base (the package at 79cc50b: `mkdir .base && git archive 79cc50b pagedllm | tar -x -C .base`); from
# the repo root:
#   bash benchmarks/scripts/next_call2.sh
# 1. W4A16 GPU tests with dot_config set from the first call's sweep (64-row blocks), GEMV_MAX_ROWS 0 and
#    DEQUANT_MIN_ROWS 256.
# 2. W4A16 micro (the new defaults per layer, no sweep); Llama-3.1-8B bs1 latency and 64 x 512/128 throughput:
#    bf16, gptq, and gptq at 79cc50b, in this call.
# 3. Issue 14: serve with 2 API servers and 4 client processes against offline, which now records its TPOT (the
#    "TPOT at unlimited rate <= 1.3x the offline step" target).
# 4. Issue 19: Qwen3-30B-A3B nano throughput, fused with graphs, then NANO_SMALL prompts fused eager vs torch eager.
# Results are packed into $OUT/results.tgz after every section.
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next2; mkdir -p $WORK/tests $WORK/w4a16 $WORK/api $WORK/moe
LIMIT=${LIMIT:-330}
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK tests w4a16 api moe; }
echo "=== tests $(date +%T)"
t() { local name=$1; shift; timeout 150 python3 -m pytest -q -p no:cacheprovider -rf "$@" > "$WORK/tests/$name.log" 2>&1; }
W4=tests/model/quantization/test_w4a16_kernel.py
t w4a16-oracle $W4 -k "matches_oracle or configs or dispatch or emulation or rejects or exact or leading" &
t w4a16-random $W4 -k "random_shapes" &
t w4a16-gpu $W4 -k "asm_dequantization or llama_shapes or cuda_graph" &
t int4-model tests/model/quantization/test_int4_model.py tests/model/quantization/test_int4_formats.py &
wait
for f in $WORK/tests/*.log; do echo "$(basename $f .log): $(tail -n 1 $f)"; grep -h "^FAILED" "$f" | head -5; done
pack; echo "=== w4a16 $(date +%T)"
OUT=$WORK/w4a16 LATENCY_MODES="bf16 gptq" LATENCY_ITERS=3 THROUGHPUT_MODES="bf16 gptq" BENCH_TAIL=2 \
  bash benchmarks/scripts/issue16_w4a16_run.sh micro latency throughput 2>&1 | grep -v "^NVIDIA\|^79cc" | tail -n 40
echo "--- latency gptq, 79cc50b"
(cd .base && PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m pagedllm.bench latency --model llama-3.1-8b \
  --batch-size 1 --input-len 32 --output-len 128 --num-iters-warmup 1 --num-iters 3 --quantization gptq \
  --output-json $WORK/w4a16/latency-llama-3.1-8b-bs1-gptq-79cc50b.json 2>&1 | grep -v "^\[bench\]" | tail -2)
echo "--- throughput gptq, 79cc50b"
(cd .base && PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m pagedllm.bench throughput --disable-tqdm \
  --model llama-3.1-8b --workload random --input-len 512 --output-len 128 --num-prompts 64 --max-num-seqs 64 \
  --quantization gptq --output-json $WORK/w4a16/throughput-llama-3.1-8b-64x512-128-gptq-79cc50b.json 2>&1 \
  | grep -v "^\[bench\]" | tail -2)
pack; echo "=== api servers $(date +%T)"
OUT=$WORK/api COUNTS="2" CLIENTS=4 bash benchmarks/scripts/serve_api_servers_run.sh 2>&1 | grep -v "^NVIDIA" \
  | grep -v "spawn_main\|resource_tracker" | tail -n 12
pack
if [ $SECONDS -lt $LIMIT ]; then
  echo "=== moe $(date +%T)"
  OUT=$WORK/moe NANO_SMALL=16 BENCH_TIMEOUT=150 bash benchmarks/scripts/issue19_moe_run.sh throughput 2>&1 \
    | grep -v "^NVIDIA" | tail -n 20
  pack
fi
echo "=== done $(date +%T) ($SECONDS s)"
