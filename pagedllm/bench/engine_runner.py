"""Runs a workload through pagedllm's offline API (``LLM.generate``) and reports what a benchmark needs."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pagedllm.bench.workloads import BenchRequest, Workload, max_token_id
from pagedllm.entrypoints.engine_args import engine_kwargs_from_cli


@dataclass(frozen=True)
class EngineRun:
    """The outcome of one timed ``generate`` call."""

    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    peak_kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (0 with prefix caching off)
    prefix_cache_hits: int = 0  # of which found cached
    ttfts_s: tuple[float, ...] = ()  # per request: first token time - arrival time
    tpots_s: tuple[float, ...] = ()  # per request of 2+ tokens: (last token time - first token time) / (tokens - 1)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``LLM`` keyword arguments from the engine flags (the same flags as ``pagedllm serve``)."""
    return engine_kwargs_from_cli(args)


_WARM_UP_CONTEXT = 64  # the warm-ups' requests fit in it: 16 + 8 tokens (warm_up), 3 + 32 (a schema's warm-up)


def fit_context(args: argparse.Namespace, workload: Workload, model_max_len: int, device: str) -> argparse.Namespace:
    """``args`` with ``max_model_len`` sized to the workload's longest request when none was given, on CPU: there
    the KV cache is a fixed byte budget (4 GiB) that a model's whole context may exceed (Qwen3-0.6B's 40,960
    tokens need 8.75 GiB in float32), and the engine refuses a context the cache cannot hold. On GPU the cache is
    sized from the device's memory, and the recorded GPU runs used the model's context: left as it is."""
    if args.max_model_len is not None or device != "cpu":
        return args
    needed = max(workload.max_seq_len, _WARM_UP_CONTEXT)
    return argparse.Namespace(**{**vars(args), "max_model_len": min(needed, model_max_len)})


def build_llm(model_dir: str, args: argparse.Namespace):
    """The engine with random weights by default (``--load-format dummy``) and no tokenizer: token-id prompts only."""
    from pagedllm.entrypoints.llm import LLM

    return LLM(model_dir, skip_tokenizer_init=True, **engine_kwargs(args))


def engine_device(llm) -> str:
    return llm.llm_engine.config.device


def engine_dtype(llm) -> str:
    return llm.llm_engine.config.model_config.dtype


def run_workload(llm, workload: Workload, use_tqdm: bool = False, lora_requests: list | None = None) -> EngineRun:
    """One timed ``LLM.generate`` over the whole workload, tracking the peak KV usage, the preemptions, the prefix
    cache's queries and hits (deltas of the engine's counters over this call) and each request's TTFT."""
    from pagedllm.bench.device import synchronize
    from pagedllm.params import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    params = [SamplingParams(temperature=workload.temperature, ignore_eos=workload.ignore_eos,
                             max_tokens=r.max_tokens) for r in workload.requests]
    before = counter_values(llm)
    device = engine_device(llm)
    with _kv_usage_probe(llm) as peak:
        synchronize(device)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm, lora_request=lora_requests)
        synchronize(device)
        elapsed = time.perf_counter() - start
    delta = {name: int(value - before[name]) for name, value in counter_values(llm).items()}
    return EngineRun(
        elapsed_s=elapsed,
        num_requests=len(outputs),
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        output_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
        peak_kv_cache_usage=peak[0],
        num_preemptions=delta["num_preemptions_total"],
        prefix_cache_queries=delta["prefix_cache_queries_total"],
        prefix_cache_hits=delta["prefix_cache_hits_total"],
        ttfts_s=tuple(ttft for ttft in map(_ttft_s, outputs) if ttft is not None),
        tpots_s=tuple(tpot for tpot in map(_tpot_s, outputs) if tpot is not None),
    )


_COUNTERS = ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total")


def counter_values(llm) -> dict[str, float]:
    """The engine counters a run reports as deltas: preemptions, prefix-cache queries and hits (tokens)."""
    return {name: _metric(llm, name) for name in _COUNTERS}


def _ttft_s(output) -> float | None:
    metrics = output.metrics
    if metrics is None or metrics.first_token_time is None or metrics.arrival_time is None:
        return None
    return metrics.first_token_time - metrics.arrival_time


def _tpot_s(output) -> float | None:
    """Time per output token after the first: in a batch that decodes together, the decode step's time. Measured
    between the request's own token timestamps, so it is never negative (unlike a difference of two runs' means)."""
    metrics, num_tokens = output.metrics, len(output.outputs[0].token_ids) if output.outputs else 0
    if metrics is None or metrics.first_token_time is None or metrics.last_token_time is None or num_tokens < 2:
        return None
    return (metrics.last_token_time - metrics.first_token_time) / (num_tokens - 1)


def warm_up(llm, workload: Workload, num_requests: int = 2, num_tokens: int = 8, lora_requests: list | None = None
            ) -> float:
    """A short untimed generate of 16-token prompts: loads kernels and allocator pools, and with adapters, one
    request per distinct adapter, so that every adapter is read from disk into the CPU cache before the timed run
    (as a server that has served each once; the timed run still pays for moving them into the device's slots).
    Its prompts start with a token no workload prompt starts with, so the blocks it leaves in the prefix cache can
    never be hit later."""
    adapters = list({request.lora_int_id: request for request in lora_requests or []}.values())
    count = max(num_requests, len(adapters))
    tiny = Workload("warmup", [BenchRequest(warmup_prompt(workload), num_tokens)] * count, workload.temperature, True)
    warm_loras = [adapters[index % len(adapters)] for index in range(count)] if adapters else None
    return run_workload(llm, tiny, lora_requests=warm_loras).elapsed_s


def warmup_prompt(workload: Workload, length: int = 16) -> list[int]:
    """The first prompt's first ``length`` ids with its first id replaced by one that starts no workload prompt
    (block hashes chain from the first block, so no workload block can then match a warm-up block)."""
    first_ids = {r.prompt_token_ids[0] for r in workload.requests if r.prompt_token_ids}
    first = workload.requests[0].prompt_token_ids[:length]
    unused = next((t for t in range(max_token_id(workload) + 1) if t not in first_ids), first[0])  # else: all taken
    return [unused, *first[1:]]


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
