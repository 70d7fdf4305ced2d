"""One line per benchmark record (JSON) in a folder: the figure each kind of record is read for.

    python3 benchmarks/scripts/summarize_records.py "$OUT"

Latency records: the decode step and the prefill; throughput and serve records: output tokens/s; anything else:
its top-level numbers. The device scripts print this at the end of a call.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def summary(record: dict) -> str:
    if record.get("bench") == "latency":
        prefill_ms = 1000 * record["prefill_latency"]["mean_s"]
        return "decode_step_ms %.3f prefill_ms %.2f" % (record["decode_step_ms"], prefill_ms)
    if "output_tokens_per_s" in record:
        return "output tok/s %.0f" % record["output_tokens_per_s"]
    return str({key: value for key, value in record.items() if isinstance(value, (int, float))})


def main(folder: str) -> None:
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as file:
            print(os.path.basename(path), summary(json.load(file)))


if __name__ == "__main__":
    main(sys.argv[1])
