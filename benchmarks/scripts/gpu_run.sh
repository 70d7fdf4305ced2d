#!/usr/bin/env bash
# The GPU runs behind benchmarks/h200: `bash benchmarks/scripts/gpu_run.sh SECTION...` on the GPU machine, from the
# repo root, with .whl and .assets carried (see device_env.sh). Records and logs go to $OUT (default: /tmp/out).
# Sections: tests nano nano-hf latency profile serve serve-http structured structured-profile grammar-fills.
source benchmarks/scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bench() { timeout 300 python3 -m pagedllm.bench "$@" 2>&1 | grep -v "^\[bench\]" | tail -12; }
for section in "$@"; do
  echo "=== $section"
  case $section in
    tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/attention tests/entrypoints/test_gpu.py \
        tests/model/test_triton_ops.py tests/worker 2>&1 | tail -15 ;;
    nano)
      bench throughput --disable-tqdm --model qwen3-0.6b --workload nano --output-json "$OUT/throughput-nano-qwen3-0.6b.json" ;;
    nano-hf)
      bench throughput --disable-tqdm --model qwen3-0.6b --workload nano --compare hf-static \
        --output-json "$OUT/throughput-nano-qwen3-0.6b-vs-hf-static.json" ;;
    latency)
      bench latency --model llama-3.1-8b --batch-size 1 --input-len 32 --output-len 128 \
        --output-json "$OUT/latency-llama-3.1-8b-bs1.json" ;;
    profile)
      timeout 200 python3 benchmarks/scripts/profile_steps.py --model qwen3-0.6b --num-seqs 256 --input-len 512 \
        2>&1 | tail -45
      timeout 200 python3 benchmarks/scripts/profile_steps.py --model llama-3.1-8b --num-seqs 1 --input-len 32 \
        --temperature 0 2>&1 | tail -45 ;;
    serve|serve-http)
      # SERVE_FLAGS (e.g. --no-engine-core-process) and SERVE_TAG (a file-name suffix) compare server modes.
      python3 -m pagedllm.entrypoints.cli serve pagedllm/bench/configs/qwen3-0.6b --load-format dummy \
        --tokenizer .assets/tokenizers/qwen3 --port 8011 $SERVE_FLAGS > "$OUT/server$SERVE_TAG.log" 2>&1 &
      server=$!
      for _ in $(seq 120); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
      common=(--base-url http://127.0.0.1:8011 --workload random --input-len 512 --output-len 128 --num-prompts 500)
      bench serve --disable-tqdm "${common[@]}" --request-rate 16 --output-json "$OUT/serve-qwen3-0.6b-rate16$SERVE_TAG.json"
      bench serve --disable-tqdm "${common[@]}" --request-rate inf --output-json "$OUT/serve-qwen3-0.6b-rate-inf$SERVE_TAG.json"
      kill -TERM $server; wait $server; echo "server exit code $?"
      [ "$section" = serve-http ] && continue
      bench throughput --disable-tqdm --model qwen3-0.6b --workload random --input-len 512 --output-len 128 --num-prompts 500 \
        --output-json "$OUT/throughput-random512-128-qwen3-0.6b.json" ;;
    structured-profile)
      timeout 300 python3 benchmarks/scripts/profile_grammar_steps.py --disable-tqdm --model qwen3-0.6b \
        --tokenizer .assets/tokenizers/qwen3 --workload random --num-prompts 256 --input-len 256 --output-len 256 \
        --structured-fraction 0.5 $PROFILE_FLAGS ${PROFILE_JSON:+--output-json "$OUT/$PROFILE_JSON"} 2>&1 \
        | grep -v "^\[bench\]" | tail -16 ;;
    grammar-fills)
      timeout 200 python3 benchmarks/scripts/grammar_fill_times.py --tokenizer .assets/tokenizers/qwen3 \
        --output-json "$OUT/grammar-fill-times-qwen3.json" 2>&1 | tail -30 ;;
    structured)
      bench throughput --disable-tqdm --model qwen3-0.6b --tokenizer .assets/tokenizers/qwen3 --workload random --num-prompts 256 \
        --input-len 256 --output-len 256 --structured-fraction 0.5 \
        --output-json "$OUT/throughput-structured-half-qwen3-0.6b.json" ;;
  esac
done
