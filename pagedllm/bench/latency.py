"""``bench latency``: one batch of fixed input and output lengths, warm-up then N timed iterations; end-to-end
latency percentiles, the prefill latency, ms per decode step, and the memory roofline of the same steps."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import numpy as np

from pagedllm.bench.common import check_vocab, model_bytes, resolved_model_config, run_baselines, succeeded
from pagedllm.bench.device import device_name, measure_bandwidth
from pagedllm.bench.engine_runner import build_llm, engine_kwargs, fit_context, run_workload
from pagedllm.bench.models import model_label, resolve_model
from pagedllm.bench.record import base_record, format_table, throughput_figures, write_record
from pagedllm.bench.roofline import decode_step_roofline_s, roofline
from pagedllm.bench.workloads import DEFAULT_TOKEN_ID_BOUND, BenchRequest, Workload, random_workload
from pagedllm.platform import resolve_device


def latency_stats(latencies_s: list[float]) -> dict[str, Any]:
    values = np.asarray(latencies_s)
    return {"mean_s": float(values.mean()), "p50_s": float(np.percentile(values, 50)),
            "p99_s": float(np.percentile(values, 99)), "all_s": [float(v) for v in values]}


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = resolve_model(args.model)
    device = resolve_device(args.device)
    model_config = resolved_model_config(model_dir, args, device)
    bound = min(DEFAULT_TOKEN_ID_BOUND, model_config.vocab_size - 1)
    workload = random_workload(args.batch_size, args.input_len, args.output_len, args.seed, bound, args.temperature)
    check_vocab(workload, model_config)
    bandwidth = measure_bandwidth(device)
    bytes_ = model_bytes(model_config, args.kv_cache_dtype, args.batch_size)
    baselines = run_baselines(args.compare, model_dir, workload, model_config.dtype, device, args.seed,
                              iters=args.num_iters, warmup_iters=args.num_iters_warmup, batch_size=args.batch_size)

    args = fit_context(args, workload, model_config.max_model_len, device)
    llm = build_llm(model_dir, args)
    for _ in range(args.num_iters_warmup):
        run_workload(llm, workload)
    runs = [run_workload(llm, workload) for _ in range(args.num_iters)]
    latencies = [run.elapsed_s for run in runs]
    prefill_only = _prefill_only(workload)
    prefill = [run_workload(llm, prefill_only).elapsed_s for _ in range(args.num_iters)]

    stats = latency_stats(latencies)
    tpots_s = [tpot for run in runs for tpot in run.tpots_s]
    decode_step_s = float(np.mean(tpots_s)) if tpots_s else None  # None: output_len 1 has no decode step
    ideal = roofline([args.input_len] * args.batch_size, [args.output_len] * args.batch_size, args.batch_size,
                     bytes_["weight_bytes_per_step"], bytes_["kv_bytes_per_token"], bandwidth)
    ideal_step_s = decode_step_roofline_s(args.batch_size, args.input_len + args.output_len / 2,
                                          bytes_["weight_bytes_per_step"], bytes_["kv_bytes_per_token"], bandwidth)
    record = base_record("latency", "pagedllm", model_label(args.model), _workload_summary(workload), device_name(device),
                         {**engine_kwargs(args), "dtype": model_config.dtype, "device": device,
                          "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
                          "num_iters": args.num_iters, "num_iters_warmup": args.num_iters_warmup,
                          "temperature": args.temperature, "compare": args.compare or []})
    record.update(throughput_figures(args.batch_size, workload.num_prompt_tokens, workload.num_output_tokens,
                                     stats["mean_s"]))
    record["startup"] = llm.llm_engine.engine_core.startup_report
    record.update({
        "latency": stats,
        "prefill_latency": latency_stats(prefill),
        # The requests' own time per output token after the first (they decode together: one step per token).
        "decode_step_ms": None if decode_step_s is None else 1000 * decode_step_s,
        "bandwidth_bytes_per_s": bandwidth,
        "roofline": {**ideal.to_dict(), "decode_step_ms": 1000 * ideal_step_s},
        "roofline_fraction": ideal_step_s / decode_step_s if decode_step_s else None,
        "baselines": {name: figures if "error" in figures else
                      {**figures, "latency": latency_stats(figures["iteration_s"])}
                      for name, figures in baselines.items()},
    })
    return record


def _prefill_only(workload: Workload) -> Workload:
    return replace(workload, requests=[BenchRequest(r.prompt_token_ids, 1) for r in workload.requests])


def _workload_summary(workload: Workload) -> dict[str, Any]:
    return {**workload.summary(), "name": "latency"}


def print_summary(record: dict[str, Any]) -> None:
    config = record["config"]
    print(f"\nLatency: {record['model']} on {record['device']}, batch {config['batch_size']}, "
          f"{config['input_len']} in / {config['output_len']} out, {config['num_iters']} iterations")
    rows = [["pagedllm", record["latency"]["mean_s"], record["latency"]["p50_s"], record["latency"]["p99_s"],
             record["output_tokens_per_s"]]]
    for name, figures in succeeded(record["baselines"]).items():
        rows.append([name, figures["latency"]["mean_s"], figures["latency"]["p50_s"], figures["latency"]["p99_s"],
                     figures["output_tokens_per_s"]])
    print(format_table(["engine", "mean s", "p50 s", "p99 s", "output tok/s"], rows))
    step = "-" if record["decode_step_ms"] is None else f"{record['decode_step_ms']:.2f}"
    print(f"prefill {1000 * record['prefill_latency']['mean_s']:.1f} ms; decode step {step} ms "
          f"vs roofline {record['roofline']['decode_step_ms']:.3f} ms "
          f"({record['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s): {100 * (record['roofline_fraction'] or 0):.1f}% "
          "of the roofline")


def main(args: argparse.Namespace) -> int:
    record = run_latency(args)
    print_summary(record)
    write_record(record, args.output_json)
    return 0
