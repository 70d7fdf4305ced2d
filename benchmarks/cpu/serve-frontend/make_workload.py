"""The replayed workload: bench serve's `random` workload (512 prompt tokens, 128 output tokens, ignore_eos), with
token ids below the tiny model's 4096. Usage: python make_workload.py NUM_PROMPTS TEMPERATURE OUT.json [OUTPUT_LEN]
(temperature 0 with the free model: seeded sampling of 256 rows per step would be most of the core's time)."""

import sys

from pagedllm.bench.workloads import random_workload, save_workload

num_prompts, temperature, path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
output_len = int(sys.argv[4]) if len(sys.argv) > 4 else 128
save_workload(random_workload(num_prompts, 512, output_len, seed=0, token_id_bound=4095, temperature=temperature),
              path)
