"""Pieces the offline bench commands share: workload selection, the model's byte counts, baselines, the table."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from pagedllm.bench.hf_baseline import BASELINES, run_baseline
from pagedllm.bench.models import load_model_config, weight_bytes_per_step
from pagedllm.bench.record import format_table
from pagedllm.bench.workloads import (
    DEFAULT_TOKEN_ID_BOUND,
    Workload,
    load_workload,
    make_workload,
    max_token_id,
    save_workload,
)
from pagedllm.config import ModelConfig


def workload_from_args(args: argparse.Namespace, vocab_size: int | None = None) -> Workload:
    """``--workload-json`` if given, else the named ``--workload`` built from its flags; then ``--limit``; saved to
    ``--save-workload`` when asked."""
    if getattr(args, "workload_json", None):
        workload = load_workload(args.workload_json)
    else:
        bound = DEFAULT_TOKEN_ID_BOUND if vocab_size is None else min(DEFAULT_TOKEN_ID_BOUND, vocab_size - 1)
        workload = make_workload(args.workload, args.num_prompts, args.input_len, args.output_len, args.seed, bound,
                                 getattr(args, "prefix_len", 256))
    workload = workload.prefix(getattr(args, "limit", None))
    if getattr(args, "save_workload", None):
        save_workload(workload, args.save_workload)
    return workload


def check_vocab(workload: Workload, model_config: ModelConfig) -> None:
    largest = max_token_id(workload)
    if largest >= model_config.vocab_size:
        raise ValueError(f"Workload {workload.name!r} has token id {largest}, beyond the vocabulary of "
                         f"{model_config.model} ({model_config.vocab_size} ids)")


def model_bytes(model_config: ModelConfig, kv_cache_dtype: str = "auto", tokens_per_step: int = 1) -> dict[str, int]:
    """Bytes a step of ``tokens_per_step`` decode tokens reads: the weights (for MoE, the experts they route to),
    and K/V per context token in the cache's dtype (half with FP8)."""
    return {"weight_bytes_per_step": weight_bytes_per_step(model_config, tokens_per_step),
            "kv_bytes_per_token": model_config.kv_bytes_per_token_in(kv_cache_dtype)}


def resolved_model_config(model_dir: str, args: argparse.Namespace, device: str) -> ModelConfig:
    return load_model_config(model_dir, args.dtype, device, args.quantization)


def run_baselines(compare: list[str] | None, model_dir: str, workload: Workload, dtype: str, device: str,
                  seed: int, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Each requested baseline in its own subprocess over the identical (saved) workload."""
    names = baseline_names(compare)
    if not names:
        return {}
    with tempfile.TemporaryDirectory(prefix="pagedllm-bench-") as tmp:
        path = str(Path(tmp) / "workload.json")
        save_workload(workload, path)
        return {name: _run_or_report(name, model_dir, path, dtype, device, seed, **kwargs) for name in names}


def _run_or_report(name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A failed baseline is reported in the record (``error``) rather than losing the engine's own measurement."""
    try:
        return run_baseline(name, *args, **kwargs)
    except RuntimeError as exc:
        print(f"[bench] {exc}", flush=True)
        return {"engine": name, "error": str(exc)}


def succeeded(baselines: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: figures for name, figures in baselines.items() if "error" not in figures}


def baseline_names(compare: list[str] | None) -> list[str]:
    """``--compare hf`` means every HF baseline; a baseline may also be named alone (``--compare hf-static``)."""
    names: list[str] = []
    for item in compare or []:
        for name in BASELINES if item == "hf" else [item]:
            if name not in names:
                names.append(name)
    return names


def comparison_table(rows: dict[str, dict[str, Any]], roofline_tokens_per_s: float | None,
                     value_key: str = "output_tokens_per_s") -> str:
    """One table: each engine's tokens/s, its ratio to each baseline, and its fraction of the roofline."""
    rows = succeeded(rows)
    baselines = [name for name in rows if name in BASELINES]
    headers = ["engine", "output tok/s", "total tok/s", "elapsed s"]
    headers += [f"x {name}" for name in baselines] + ["of roofline"]
    table = []
    for name, figures in rows.items():
        row = [name, figures[value_key], figures["total_tokens_per_s"], figures["elapsed_s"]]
        row += [figures[value_key] / rows[b][value_key] for b in baselines]
        row.append(figures[value_key] / roofline_tokens_per_s if roofline_tokens_per_s else None)
        table.append(row)
    return format_table(headers, table)
