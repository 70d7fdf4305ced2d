"""Medians per section and tree of the records measure.sh wrote; prints a table and writes summary.json.
Usage: python summarize.py RESULTS_DIR"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics
import sys

SERVE_FIGURES = {  # name -> how to read it from a serve record
    "output_tok_per_s": lambda r: r["output_tokens_per_s"],
    "ttft_mean_ms": lambda r: r["metrics"]["ttft_ms"]["mean"],
    "itl_median_ms": lambda r: r["metrics"]["itl_ms"]["median"],
    "duration_s": lambda r: r["metrics"]["duration_s"],
    "api_server_cpu_s": lambda r: r["process_cpu"]["api_server_cpu_s"],
    "api_server_cpu_ms_per_request": lambda r: r["process_cpu"]["api_server_cpu_ms_per_request"],
    "api_server_cpu_us_per_output_token": lambda r: r["process_cpu"]["api_server_cpu_us_per_output_token"],
    "api_server_main_thread_s": lambda r: list(r["process_cpu"]["api_server_threads_s"].values())[0],
    "api_server_engine_thread_s": lambda r: list(r["process_cpu"]["api_server_threads_s"].values())[1],
    "api_server_gc_s": lambda r: r["process_cpu"]["api_server_gc_s"],
    "engine_core_cpu_s": lambda r: r["process_cpu"]["engine_core_cpu_s"],
    "engine_core_gc_s": lambda r: r["process_cpu"]["engine_core_gc_s"],
}


def median_figures(records: list[dict], figures: dict) -> dict:
    return {name: round(statistics.median(read(r) for r in records), 3) for name, read in figures.items()}


def main() -> None:
    results = sys.argv[1]
    groups: dict[str, list[dict]] = {}
    for path in glob.glob(os.path.join(results, "serve-*.json")):
        group = re.sub(r"-\d+$", "", os.path.basename(path)[len("serve-"):-len(".json")])
        groups.setdefault(group, []).append(json.load(open(path)))
    summary = {group: {"runs": len(records), **median_figures(records, SERVE_FIGURES)}
               for group, records in sorted(groups.items())}
    for tree in ("base", "new"):
        micro = [json.load(open(p)) for p in glob.glob(os.path.join(results, f"micro-{tree}-*.json"))]
        if micro:
            summary[f"micro-{tree}"] = {"runs": len(micro), **{k: round(min(m[k] for m in micro), 2) for k in micro[0]}}
        offline = os.path.join(results, f"offline-free-{tree}.json")
        if os.path.exists(offline):
            summary[f"offline-free-{tree}"] = {"output_tok_per_s": round(json.load(open(offline))["output_tokens_per_s"])}
    json.dump(summary, open(os.path.join(results, "summary.json"), "w"), indent=1)
    for group, figures in summary.items():
        print(group, figures)


if __name__ == "__main__":
    main()
