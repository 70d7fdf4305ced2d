#!/usr/bin/env bash
# Session 32's fourth H200 call (~240 s): is the Qwen3-0.6B batch-1 decode step host-bound with PDL on? (call 3
# measured 1.19 and 1.29 ms against a 0.82 ms graph replay; call 1 0.93 ms): the host time per engine phase beside
# the GPU's (profile_host_phases.py), then the batch-1 latency of Qwen3-0.6B and Llama-3.1-8B again.
# Carry .whl and .assets; from the repo root:   bash benchmarks/scripts/next_call11.sh
source benchmarks/scripts/device_env.sh || exit 1
WORK=/tmp/next11; mkdir -p $WORK
pack() { tar czf "${OUT:-/tmp/out}/results.tgz" -C $WORK .; }
timeout 120 python3 benchmarks/scripts/profile_host_phases.py --model qwen3-0.6b --input-len 32 --output-len 128 \
  > $WORK/host-phases-qwen3-0.6b.log 2>&1
sed -n '/^{/,/^}/p' $WORK/host-phases-qwen3-0.6b.log | head -n 60
pack
for record in qwen3-0.6b-1 llama-3.1-8b-1 qwen3-0.6b-2; do
  timeout 100 python3 -m pagedllm.bench latency --model ${record%-*} --batch-size 1 --input-len 32 --output-len 128 \
    --num-iters-warmup 1 --num-iters 3 --output-json $WORK/latency-$record.json > $WORK/latency-$record.log 2>&1
  grep "decode step" $WORK/latency-$record.log || tail -n 3 $WORK/latency-$record.log
done
pack
echo "=== done $(date +%T) ($SECONDS s)"
