"""``bench throughput``: the whole workload offline through ``LLM.generate`` after a warm-up, next to the HF
baselines (``--compare hf``, each in its own subprocess) and the memory roofline."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from pagedllm.bench.common import (
    check_vocab,
    comparison_table,
    model_bytes,
    resolved_model_config,
    run_baselines,
    workload_from_args,
)
from pagedllm.bench.device import device_name, measure_bandwidth
from pagedllm.bench.engine_runner import EngineRun, engine_kwargs, fit_context, run_workload, warm_up
from pagedllm.bench.lora import random_adapters, spread
from pagedllm.bench.models import model_label, resolve_model
from pagedllm.bench.record import base_record, throughput_figures, write_record
from pagedllm.bench.roofline import roofline
from pagedllm.bench.structured import build_llm, check_fraction, run_structured, summary_lines
from pagedllm.platform import resolve_device


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    check_fraction(args.structured_fraction)
    model_dir = resolve_model(args.model)
    device = resolve_device(args.device)
    model_config = resolved_model_config(model_dir, args, device)
    workload = workload_from_args(args, model_config.vocab_size)
    check_vocab(workload, model_config)
    print(f"[bench] workload {workload.name}: {len(workload.requests)} requests, {workload.num_prompt_tokens} prompt "
          f"and {workload.num_output_tokens} output tokens", flush=True)
    bandwidth = measure_bandwidth(device)  # before any engine holds the device's memory
    bytes_ = model_bytes(model_config, args.kv_cache_dtype, args.max_num_seqs)  # MoE: full steps
    bound = roofline([len(r.prompt_token_ids) for r in workload.requests], [r.max_tokens for r in workload.requests],
                     args.max_num_seqs, bytes_["weight_bytes_per_step"], bytes_["kv_bytes_per_token"], bandwidth)
    baselines = run_baselines(args.compare, model_dir, workload, model_config.dtype, device, args.seed)

    args = fit_context(args, workload, model_config.max_model_len, device)
    adapters = random_adapters(model_config, args.num_loras, args.max_lora_rank, args.seed) if args.num_loras else []
    lora_requests = spread(adapters, len(workload.requests))
    if adapters:
        args = argparse.Namespace(**{**vars(args), "enable_lora": True})
    start = time.perf_counter()
    llm = build_llm(model_dir, args)
    load_s = time.perf_counter() - start
    warmup_s = warm_up(llm, workload, lora_requests=lora_requests)
    structured = None
    if args.structured_fraction > 0:
        result, structured = run_structured(llm, workload, args.structured_fraction)
    else:
        result = run_workload(llm, workload, use_tqdm=not args.disable_tqdm, lora_requests=lora_requests)

    config = {**_config(args, model_config.dtype, device),
              "enable_prefix_caching": llm.llm_engine.config.cache_config.enable_prefix_caching}  # as resolved
    record = base_record("throughput", "pagedllm", model_label(args.model), workload.summary(), device_name(device),
                         config)
    record.update(throughput_figures(result.num_requests, result.prompt_tokens, result.output_tokens,
                                     result.elapsed_s))
    record.update({
        "peak_kv_cache_usage": result.peak_kv_cache_usage,
        "num_preemptions": result.num_preemptions,
        **prefix_cache_figures(result),
        "ttft": latency_stats(result.ttfts_s),
        "tpot": latency_stats(result.tpots_s),
        "load_s": load_s,
        "startup": llm.llm_engine.engine_core.startup_report,
        "warmup_s": warmup_s,
        **cpu_figures(device),
        "bandwidth_bytes_per_s": bandwidth,
        "roofline": bound.to_dict(),
        "roofline_fraction": record["output_tokens_per_s"] / bound.output_tokens_per_s,
        "baselines": {name: figures if "error" in figures else
                      {**figures, "roofline_fraction": figures["output_tokens_per_s"] / bound.output_tokens_per_s}
                      for name, figures in baselines.items()},
    })
    if structured is not None:
        record["structured_outputs"] = structured
    if adapters:
        record["lora"] = {"num_loras": len(adapters), "max_loras": args.max_loras, "rank": args.max_lora_rank,
                          "slot_loads": llm.llm_engine.engine_core.model_runner.lora.num_slot_loads}
    return record


def cpu_figures(device: str) -> dict[str, Any]:
    """On CPU, the torch threads the engine ran with and the machine's 1-minute load average after the run: a busy
    machine changes CPU figures several-fold."""
    if device != "cpu":
        return {}
    import torch

    return {"cpu_threads_used": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]}


def prefix_cache_figures(result: EngineRun) -> dict[str, Any]:
    """What prefix caching saved: the hit rate over looked-up prompt tokens, and the prompt tokens the engine had to
    compute (prompt tokens - hits; recomputation after a preemption is not counted)."""
    return {
        "prefix_cache_queries": result.prefix_cache_queries,
        "prefix_cache_hits": result.prefix_cache_hits,
        "prefix_cache_hit_rate": result.prefix_cache_hit_rate,
        "prompt_tokens_computed": result.prompt_tokens - result.prefix_cache_hits,
    }


def latency_stats(values_s: tuple[float, ...]) -> dict[str, float | None]:
    """Mean, p50 and p99 of per-request times in seconds: the time to first token (first token time - arrival
    time; offline every request arrives when ``generate`` starts, so it is mostly the time a request queued behind
    earlier prefills) or the time per output token after the first (what ``bench serve``'s TPOT compares with)."""
    if not values_s:
        return {"mean_s": None, "p50_s": None, "p99_s": None}
    values = np.asarray(values_s)
    return {"mean_s": float(values.mean()), "p50_s": float(np.percentile(values, 50)),
            "p99_s": float(np.percentile(values, 99))}


def _config(args: argparse.Namespace, dtype: str, device: str) -> dict[str, Any]:
    return {**engine_kwargs(args), "dtype": dtype, "device": device, "limit": args.limit,
            "structured_fraction": args.structured_fraction,
            "compare": args.compare or [], "model_dir": resolve_model(args.model)}


def print_summary(record: dict[str, Any]) -> None:
    rows = {"pagedllm": record, **record.get("baselines", {})}
    print(f"\nThroughput: {record['model']} on {record['device']}, workload {record['workload']['name']} "
          f"({record['num_requests']} requests)")
    print(comparison_table(rows, record["roofline"]["output_tokens_per_s"]))
    print(f"roofline: {record['roofline']['output_tokens_per_s']:,.0f} output tok/s at "
          f"{record['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s; peak KV cache usage "
          f"{100 * record['peak_kv_cache_usage']:.1f}%, {record['num_preemptions']} preemptions")
    ttft = record["ttft"]
    print(f"prefix cache: hit rate {100 * record['prefix_cache_hit_rate']:.1f}% "
          f"({'on' if record['config']['enable_prefix_caching'] else 'off'}), prompt tokens computed "
          f"{record['prompt_tokens_computed']:,} of {record['prompt_tokens']:,}; TTFT mean "
          f"{_ms(ttft['mean_s'])} p50 {_ms(ttft['p50_s'])} p99 {_ms(ttft['p99_s'])} ms (offline: all requests "
          f"arrive at once, so TTFT is mostly queueing); TPOT mean {_ms(record['tpot']['mean_s'])} p50 "
          f"{_ms(record['tpot']['p50_s'])} ms")
    if "structured_outputs" in record:
        print("\n".join(summary_lines(record["structured_outputs"])))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:,.1f}"


def main(args: argparse.Namespace) -> int:
    record = run_throughput(args)
    print_summary(record)
    write_record(record, args.output_json)
    return 0
