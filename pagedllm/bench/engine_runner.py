"""Runs a workload through pagedllm's offline API (``LLM.generate``) and reports what a benchmark needs."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pagedllm.bench.workloads import BenchRequest, Workload

# ``bench`` flags that become ``LLM(...)`` arguments, by the attribute argparse gives them.
ENGINE_ARG_NAMES = (
    "dtype", "device", "seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
    "enable_chunked_prefill", "enable_prefix_caching", "kv_cache_memory_bytes", "num_gpu_blocks_override",
    "gpu_memory_utilization", "load_format", "enforce_eager",
)


@dataclass(frozen=True)
class EngineRun:
    """The outcome of one timed ``generate`` call."""

    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    peak_kv_cache_usage: float
    num_preemptions: int


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ENGINE_ARG_NAMES if hasattr(args, name)}


def build_llm(model_dir: str, args: argparse.Namespace):
    """The engine with random weights by default (``--load-format dummy``) and no tokenizer: token-id prompts only."""
    from pagedllm.entrypoints.llm import LLM

    return LLM(model_dir, skip_tokenizer_init=True, **engine_kwargs(args))


def engine_device(llm) -> str:
    return llm.llm_engine.config.device


def engine_dtype(llm) -> str:
    return llm.llm_engine.config.model_config.dtype


def run_workload(llm, workload: Workload, use_tqdm: bool = False) -> EngineRun:
    """One timed ``LLM.generate`` over the whole workload, tracking the peak KV usage and the preemptions."""
    from pagedllm.bench.device import synchronize
    from pagedllm.params import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    params = [SamplingParams(temperature=workload.temperature, ignore_eos=workload.ignore_eos,
                             max_tokens=r.max_tokens) for r in workload.requests]
    preemptions_before = _metric(llm, "num_preemptions_total")
    device = engine_device(llm)
    with _kv_usage_probe(llm) as peak:
        synchronize(device)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
        synchronize(device)
        elapsed = time.perf_counter() - start
    return EngineRun(
        elapsed_s=elapsed,
        num_requests=len(outputs),
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        output_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
        peak_kv_cache_usage=peak[0],
        num_preemptions=int(_metric(llm, "num_preemptions_total") - preemptions_before),
    )


def warm_up(llm, workload: Workload, num_requests: int = 2, num_tokens: int = 8) -> float:
    """A short untimed generate (the first prompts' first 16 tokens): loads kernels and allocator pools."""
    first = workload.requests[0].prompt_token_ids[:16]
    tiny = Workload("warmup", [BenchRequest(first, num_tokens)] * num_requests, workload.temperature, True)
    return run_workload(llm, tiny).elapsed_s


@contextlib.contextmanager
def _kv_usage_probe(llm) -> Iterator[list[float]]:
    """Wraps the engine's ``step`` to read the KV cache usage gauge after every step; yields ``[peak]``."""
    engine = llm.llm_engine
    peak = [0.0]
    original_step = engine.step

    def step():
        outputs = original_step()
        peak[0] = max(peak[0], engine.metrics.scheduler.kv_cache_usage)
        return outputs

    engine.step = step
    try:
        yield peak
    finally:
        del engine.step  # back to the class's method


def _metric(llm, short_name: str) -> float:
    for metric in llm.get_metrics():
        if metric.name.endswith(":" + short_name):
            return metric.value
    return 0.0
