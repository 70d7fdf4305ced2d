"""Benchmark records: one JSON object per command with the fields every record carries, plus the printed table."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_FIELDS = (
    "engine", "model", "workload", "device", "versions", "git_commit", "config", "num_requests", "prompt_tokens",
    "output_tokens", "elapsed_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
)
_PACKAGES = ("pagedllm", "torch", "transformers", "numpy", "httpx")


def throughput_figures(num_requests: int, prompt_tokens: int, output_tokens: int, elapsed_s: float) -> dict[str, Any]:
    """The counts and rates every record (and every baseline inside one) carries."""
    return {
        "num_requests": num_requests,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "elapsed_s": elapsed_s,
        "requests_per_s": num_requests / elapsed_s,
        "output_tokens_per_s": output_tokens / elapsed_s,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed_s,
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    if "torch" in sys.modules:
        import torch

        found["cuda"] = torch.version.cuda
    return found


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, with ``-dirty`` when tracked files differ; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def base_record(bench: str, engine: str, model: str, workload: dict[str, Any] | str, device: str,
                config: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": bench,
        "engine": engine,
        "model": model,
        "workload": workload,
        "device": device,
        "versions": versions(),
        "git_commit": git_commit(),
        "config": config,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_record(record: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
        print(f"Wrote {path}")


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table, right-aligned numbers, floats with 2 decimals."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    for row in cells:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)
