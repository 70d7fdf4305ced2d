# Sourced by the device scripts: `lora_run MODEL TAG TIMEOUT NUM_LORAS WORKLOAD_ARGS...` runs `bench throughput` with
# NUM_LORAS random rank-16 adapters on all projections (8 slots, a CPU cache of 64) into $LORA_OUT/MODEL-TAG-lorasN.json;
# `python3 benchmarks/scripts/lora_shares.py $LORA_OUT` then prints each run's share of its base run.
lora_run() {
  local model=$1 tag=$2 limit=$3 n=$4; shift 4
  timeout "$limit" python3 -m pagedllm.bench throughput --model "$model" --num-loras "$n" --max-loras 8 \
    --max-lora-rank 16 --max-cpu-loras 64 --disable-tqdm "$@" --output-json "$LORA_OUT/$model-$tag-loras$n.json" \
    2>&1 | grep -v "^\[bench\] " | tail -n 1
}
