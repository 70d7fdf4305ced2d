"""``bench throughput``: the whole workload offline through ``LLM.generate`` after a warm-up, next to the HF
baselines (``--compare hf``, each in its own subprocess) and the memory roofline."""

from __future__ import annotations

import argparse
import time
from typing import Any

from pagedllm.bench.common import (
    check_vocab,
    comparison_table,
    model_bytes,
    resolved_model_config,
    run_baselines,
    workload_from_args,
)
from pagedllm.bench.device import device_name, measure_bandwidth
from pagedllm.bench.engine_runner import build_llm, engine_kwargs, run_workload, warm_up
from pagedllm.bench.models import model_label, resolve_model
from pagedllm.bench.record import base_record, throughput_figures, write_record
from pagedllm.bench.roofline import roofline
from pagedllm.platform import resolve_device


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = resolve_model(args.model)
    device = resolve_device(args.device)
    model_config = resolved_model_config(model_dir, args, device)
    workload = workload_from_args(args, model_config.vocab_size)
    check_vocab(workload, model_config)
    print(f"[bench] workload {workload.name}: {len(workload.requests)} requests, {workload.num_prompt_tokens} prompt "
          f"and {workload.num_output_tokens} output tokens", flush=True)
    bandwidth = measure_bandwidth(device)  # before any engine holds the device's memory
    bytes_ = model_bytes(model_config)
    bound = roofline([len(r.prompt_token_ids) for r in workload.requests], [r.max_tokens for r in workload.requests],
                     args.max_num_seqs, bytes_["weight_bytes_per_step"], bytes_["kv_bytes_per_token"], bandwidth)
    baselines = run_baselines(args.compare, model_dir, workload, model_config.dtype, device, args.seed)

    start = time.perf_counter()
    llm = build_llm(model_dir, args)
    load_s = time.perf_counter() - start
    warmup_s = warm_up(llm, workload)
    result = run_workload(llm, workload, use_tqdm=not args.disable_tqdm)

    record = base_record("throughput", "pagedllm", model_label(args.model), workload.summary(), device_name(device),
                         _config(args, model_config.dtype, device))
    record.update(throughput_figures(result.num_requests, result.prompt_tokens, result.output_tokens,
                                     result.elapsed_s))
    record.update({
        "peak_kv_cache_usage": result.peak_kv_cache_usage,
        "num_preemptions": result.num_preemptions,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "bandwidth_bytes_per_s": bandwidth,
        "roofline": bound.to_dict(),
        "roofline_fraction": record["output_tokens_per_s"] / bound.output_tokens_per_s,
        "baselines": {name: figures if "error" in figures else
                      {**figures, "roofline_fraction": figures["output_tokens_per_s"] / bound.output_tokens_per_s}
                      for name, figures in baselines.items()},
    })
    return record


def _config(args: argparse.Namespace, dtype: str, device: str) -> dict[str, Any]:
    return {**engine_kwargs(args), "dtype": dtype, "device": device, "limit": args.limit,
            "compare": args.compare or [], "model_dir": resolve_model(args.model)}


def print_summary(record: dict[str, Any]) -> None:
    rows = {"pagedllm": record, **record.get("baselines", {})}
    print(f"\nThroughput: {record['model']} on {record['device']}, workload {record['workload']['name']} "
          f"({record['num_requests']} requests)")
    print(comparison_table(rows, record["roofline"]["output_tokens_per_s"]))
    print(f"roofline: {record['roofline']['output_tokens_per_s']:,.0f} output tok/s at "
          f"{record['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s; peak KV cache usage "
          f"{100 * record['peak_kv_cache_usage']:.1f}%, {record['num_preemptions']} preemptions")


def main(args: argparse.Namespace) -> int:
    record = run_throughput(args)
    print_summary(record)
    write_record(record, args.output_json)
    return 0
