"""``bench plot``: records -> PNG charts (throughput by engine; serving latency percentiles vs request rate).

matplotlib is an optional dependency (``pip install "pagedllm[bench]"``), imported only here, lazily.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from pagedllm.bench.record import write_record

_SERVE_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency"))


def load_records(paths: list[str]) -> list[dict[str, Any]]:
    """Records from JSON files, or from every ``*.json`` under given directories (files that are not records are
    skipped)."""
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(sorted(path.rglob("*.json")) if path.is_dir() else [path])
    records = []
    for file in files:
        data = json.loads(file.read_text())
        if isinstance(data, dict) and "engine" in data and "output_tokens_per_s" in data:
            records.append({**data, "_path": str(file)})
    return records


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('bench plot needs matplotlib: pip install "pagedllm[bench]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: one group per offline record (model, workload, device), one bar per engine in it."""
    offline = [r for r in records if r.get("bench") in ("throughput", "latency")]
    if not offline:
        return None
    plt = _pyplot()
    groups = [(_group_label(r), {"pagedllm": r["output_tokens_per_s"],
                                 **{n: b["output_tokens_per_s"] for n, b in r.get("baselines", {}).items()
                                    if "output_tokens_per_s" in b}})
              for r in offline]
    engines = sorted({engine for _, bars in groups for engine in bars}, key=lambda e: (e != "pagedllm", e))
    width = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(groups)), 4.5))
    for i, engine in enumerate(engines):
        xs = [g + (i - (len(engines) - 1) / 2) * width for g, (_, bars) in enumerate(groups) if engine in bars]
        ys = [bars[engine] for _, bars in groups if engine in bars]
        ax.bar(xs, ys, width, label=engine)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput by engine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _group_label(record: dict[str, Any]) -> str:
    workload = record["workload"]["name"] if isinstance(record["workload"], dict) else record["workload"]
    limit = (record["workload"].get("params") or {}).get("limit") if isinstance(record["workload"], dict) else None
    if limit:
        workload += f" (first {limit})"
    if record.get("bench") == "latency":
        c = record["config"]
        workload = f"latency bs{c['batch_size']} {c['input_len']}/{c['output_len']}"
    return f"{record['model']}\n{workload}\n{record['device']}"


def plot_serving(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Median and p99 of TTFT, TPOT, ITL and E2E latency against the request rate, one line per engine/model."""
    serving = [r for r in records if r.get("bench") == "serve"]
    if not serving:
        return None
    plt = _pyplot()
    finite = [r["request_rate"] for r in serving if math.isfinite(r["request_rate"])]
    inf_x = 2 * max(finite) if finite else 1.0  # "all at once" is drawn right of the largest finite rate
    has_inf = len(finite) < len(serving)
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in serving:
        series[f"{record['engine']} ({record['model']})"].append(record)
    fig, axes = plt.subplots(1, len(_SERVE_METRICS), figsize=(16, 4))
    for ax, (key, title) in zip(axes, _SERVE_METRICS):
        for label, items in series.items():
            items = sorted(items, key=lambda r: r["request_rate"])
            xs = [r["request_rate"] if math.isfinite(r["request_rate"]) else inf_x for r in items]
            ax.plot(xs, [r["metrics"][key]["median"] for r in items], marker="o", label=f"{label} p50")
            ax.plot(xs, [r["metrics"][key]["p99"] for r in items], marker="x", linestyle="--", label=f"{label} p99")
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("request rate (req/s)" + (f"; all at once drawn at {inf_x:g}" if has_inf else ""))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    records = load_records(args.records)
    if not records:
        raise SystemExit(f"No benchmark records found in {', '.join(args.records)}")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = [plot_throughput(records, out_dir / "throughput.png"), plot_serving(records, out_dir / "serving.png")]
    charts = [str(c) for c in charts if c is not None]
    for chart in charts:
        print(f"Wrote {chart}")
    write_record({"bench": "plot", "charts": charts, "records": [r["_path"] for r in records]}, args.output_json)
    return 0
