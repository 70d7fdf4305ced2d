"""Print each ``bench throughput --num-loras`` record of a folder with its share of the base run beside it (the
record of the same name ending in ``-loras0``): ``python benchmarks/scripts/lora_shares.py DIR``."""

from __future__ import annotations

import json
import pathlib
import sys


def main(folder: str) -> None:
    records = {path.stem: json.loads(path.read_text()) for path in sorted(pathlib.Path(folder).glob("*-loras*.json"))}
    for name, record in records.items():
        base = records.get(name.rsplit("-loras", 1)[0] + "-loras0")
        share = f"{record['output_tokens_per_s'] / base['output_tokens_per_s']:.1%} of base" if base else ""
        print(name, round(record["output_tokens_per_s"]), "out tok/s", share)


if __name__ == "__main__":
    main(sys.argv[1])
