#!/usr/bin/env bash
# A/B of CPU offline throughput: /tmp/base27 (git archive bffb4c2) vs /work/main, alternated; stories260K, 128 x 64/128.
# Usage: bash ab.sh OUT_DIR
set -u
OUT=$1; shift
PY=/work/main/.venv/bin/python
for round in 1 2 3 4; do
  for pair in "base:/tmp/base27" "head:/work/main"; do
    name=${pair%%:*} tree=${pair#*:}
    (cd $tree && PYTHONPATH=$tree $PY -m pagedllm.bench throughput --model /work/shared/assets/models/stories260K \
      --device cpu --workload random --num-prompts 128 --input-len 64 --output-len 128 \
      --output-json $OUT/$name-$round.json > $OUT/$name-$round.log 2>&1)
  done
done
