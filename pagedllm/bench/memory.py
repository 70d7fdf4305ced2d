"""``bench memory``: KV blocks in use when sequences share blocks, against the same work done with no sharing at all,
as the PagedAttention paper measures it (section 6.3: "memory saving" of parallel sampling and beam search).

Two sharing modes, each next to its own baseline on the same seeded workload:

- **parallel sampling**: each prompt is one request with ``SamplingParams(n=N, seed=s)``; its N sequences share the
  prompt's blocks, and the partly filled last block is copied when they write into it. Baseline: N independent
  requests per prompt with seeds ``s, s+1, ..., s+N-1``, the seeds the n sequences use, so they compute the very
  same tokens (the record counts the sequences that came out identical).
- **beam search**: ``LLM.beam_search`` with width W, ``ignore_eos`` (every hypothesis runs to ``max_tokens``); its
  beams share the prompt and their common generated prefix, through prefix caching. Baseline: W independent sampled
  requests per prompt generating the same ``max_tokens`` (``ignore_eos``), i.e. every beam holding its own copy of
  the prompt and of its tokens: the paper's "no sharing". With N == W and one output length this is the very same
  run as the parallel-sampling baseline, which is then measured once and reused.

The sharing runs use an engine with prefix caching on (beam search shares through it), the baselines one with prefix
caching off, so that they share nothing. Both engines get the same KV cache budget.

"Blocks in use" are the pool's blocks held by requests (cached free blocks, which a new request may evict, count as
free), sampled once per engine step that computes tokens, right after the scheduler has reserved the step's blocks:
the blocks the forward pass works on. (Sampling after the step would miss beam search entirely: each beam runs as a
one-token request that finishes, and frees its blocks, within the step.) Over a run we report the mean and the peak;
"blocks saved" is ``1 - sharing / baseline``, of the mean (the paper's figure) and of the peak.

A workload whose requests have different output lengths runs its beam searches (and their baselines) one output
length at a time, since one ``LLM.beam_search`` call takes one ``max_tokens``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from pagedllm.bench.common import check_vocab, resolved_model_config, workload_from_args
from pagedllm.bench.device import device_name, synchronize
from pagedllm.bench.engine_runner import counter_values, engine_kwargs, warm_up
from pagedllm.bench.models import model_label, resolve_model
from pagedllm.bench.record import base_record, format_table, throughput_figures, write_record
from pagedllm.bench.workloads import Workload
from pagedllm.platform import resolve_device


@dataclass
class BlockSamples:
    """Blocks in use (and, of those, shared by more than one request) at each sampled step."""

    num_blocks: int  # size of the pool
    in_use: list[int] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        steps = len(self.in_use)
        mean = sum(self.in_use) / steps if steps else 0.0
        peak = max(self.in_use, default=0)
        return {
            "num_steps": steps,
            "mean_blocks": mean,
            "peak_blocks": peak,
            "mean_shared_blocks": sum(self.shared) / steps if steps else 0.0,
            "peak_shared_blocks": max(self.shared, default=0),
            "mean_kv_cache_usage": mean / self.num_blocks,
            "peak_kv_cache_usage": peak / self.num_blocks,
        }


@contextlib.contextmanager
def block_probe(llm) -> Iterator[BlockSamples]:
    """Wraps the scheduler's ``schedule`` to read the block pool after every step that computes tokens."""
    scheduler = llm.llm_engine.engine_core.scheduler
    pool = scheduler.kv_cache_manager.pool
    samples = BlockSamples(pool.num_blocks)
    original_schedule = scheduler.schedule

    def schedule():
        output = original_schedule()
        if output.total_num_scheduled_tokens:
            samples.in_use.append(pool.num_blocks - pool.num_free_blocks)
            samples.shared.append(pool.num_shared_blocks)
        return output

    scheduler.schedule = schedule
    try:
        yield samples
    finally:
        del scheduler.schedule  # back to the class's method


@dataclass
class Outcome:
    """What a run produced: per prompt, its sequences' token ids (in sequence order)."""

    sequences: list[list[list[int]]]

    @property
    def output_tokens(self) -> int:
        return sum(len(tokens) for per_prompt in self.sequences for tokens in per_prompt)


def measure(llm, work: Callable[[], Outcome]) -> tuple[dict[str, Any], Outcome]:
    """Run ``work`` on ``llm`` with the block probe on; return the run's figures and what it produced."""
    device = llm.llm_engine.config.device
    before = counter_values(llm)
    with block_probe(llm) as samples:
        synchronize(device)
        start = time.perf_counter()
        outcome = work()
        synchronize(device)
        elapsed = time.perf_counter() - start
    delta = {name: int(value - before[name]) for name, value in counter_values(llm).items()}
    figures = {
        "prefix_caching": llm.llm_engine.config.cache_config.enable_prefix_caching,
        **samples.summary(),
        "num_sequences": sum(len(per_prompt) for per_prompt in outcome.sequences),
        "output_tokens": outcome.output_tokens,
        "elapsed_s": elapsed,
        "num_preemptions": delta["num_preemptions_total"],
        "prefix_cache_queries": delta["prefix_cache_queries_total"],
        "prefix_cache_hits": delta["prefix_cache_hits_total"],
    }
    return figures, outcome


# ---- the work of each run ----------------------------------------------------------------------------------------

def request_seed(base_seed: int, prompt_index: int, copies: int) -> int:
    """The seed of prompt ``prompt_index``'s first sequence; its others use the next ``copies - 1`` seeds."""
    return base_seed + copies * prompt_index


def parallel_sampling(llm, workload: Workload, n: int, seed: int) -> Outcome:
    """Each prompt once, with ``n`` sequences sharing its blocks."""
    from pagedllm.params import SamplingParams

    params = [SamplingParams(n=n, seed=request_seed(seed, i, n), temperature=workload.temperature,
                             max_tokens=r.max_tokens, ignore_eos=True) for i, r in enumerate(workload.requests)]
    outputs = llm.generate(_prompts(workload), params, use_tqdm=False)
    return Outcome([[c.token_ids for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs])


def independent(llm, workload: Workload, copies: int, seed: int) -> Outcome:
    """Each prompt ``copies`` times as separate requests, with the seeds of ``parallel_sampling``'s sequences."""
    from pagedllm.params import SamplingParams

    prompts, params = [], []
    for i, request in enumerate(workload.requests):
        for j in range(copies):
            prompts.append({"prompt_token_ids": request.prompt_token_ids})
            params.append(SamplingParams(seed=request_seed(seed, i, copies) + j, temperature=workload.temperature,
                                         max_tokens=request.max_tokens, ignore_eos=True))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    return Outcome([tokens[i * copies:(i + 1) * copies] for i in range(len(workload.requests))])


def beam_search(llm, workload: Workload, beam_width: int, length_penalty: float) -> Outcome:
    """``LLM.beam_search`` over the workload, one call per output length; the kept hypotheses of each prompt."""
    from pagedllm.params import BeamSearchParams

    sequences: list[list[list[int]]] = [[] for _ in workload.requests]
    for max_tokens, indices in output_length_groups(workload).items():
        params = BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens, ignore_eos=True,
                                  length_penalty=length_penalty)
        results = llm.beam_search([{"prompt_token_ids": workload.requests[i].prompt_token_ids} for i in indices],
                                  params)
        for i, result in zip(indices, results):
            sequences[i] = [list(s.token_ids) for s in result.sequences]
    return Outcome(sequences)


def independent_by_length(llm, workload: Workload, copies: int, seed: int) -> Outcome:
    """``independent``, one output length at a time, as ``beam_search`` runs."""
    sequences: list[list[list[int]]] = [[] for _ in workload.requests]
    for indices in output_length_groups(workload).values():
        part = replace(workload, requests=[workload.requests[i] for i in indices])
        for i, per_prompt in zip(indices, independent(llm, part, copies, seed).sequences):
            sequences[i] = per_prompt
    return Outcome(sequences)


def output_length_groups(workload: Workload) -> dict[int, list[int]]:
    """Request indices by ``max_tokens``, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for index, request in enumerate(workload.requests):
        groups.setdefault(request.max_tokens, []).append(index)
    return groups


def _prompts(workload: Workload) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]


# ---- the command -------------------------------------------------------------------------------------------------

def blocks_saved_pct(sharing: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """Percent of the baseline's blocks in use that sharing saves, of the mean and of the peak."""
    return {key: 100.0 * (1.0 - sharing[f"{key}_blocks"] / baseline[f"{key}_blocks"])
            if baseline[f"{key}_blocks"] else None for key in ("mean", "peak")}


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = resolve_model(args.model)
    device = resolve_device(args.device)
    model_config = resolved_model_config(model_dir, args, device)
    workload = workload_from_args(args, model_config.vocab_size)
    check_vocab(workload, model_config)
    modes = list(dict.fromkeys(args.modes))
    if "parallel-sampling" in modes and workload.temperature <= 0:
        raise ValueError("Parallel sampling needs a temperature above 0; the workload has "
                         f"{workload.temperature}")
    print(f"[bench] memory: workload {workload.name}: {len(workload.requests)} prompts, "
          f"{workload.num_prompt_tokens} prompt tokens; modes {', '.join(modes)}", flush=True)
    single_length = len(output_length_groups(workload)) == 1
    reuse_baseline = "parallel-sampling" in modes and args.n == args.beam_width and single_length

    results: dict[str, dict[str, Any]] = {}
    outcomes: dict[str, Outcome] = {}
    with _engine(model_dir, args, workload, prefix_caching=True) as llm:
        num_blocks = llm.llm_engine.engine_core.num_blocks
        if "parallel-sampling" in modes:
            results["parallel_sampling"], outcomes["parallel_sampling"] = measure(
                llm, lambda: parallel_sampling(llm, workload, args.n, args.seed))
        if "beam-search" in modes:
            results["beam_search"], _ = measure(
                llm, lambda: beam_search(llm, workload, args.beam_width, args.length_penalty))
    with _engine(model_dir, args, workload, prefix_caching=False) as llm:
        if "parallel-sampling" in modes:
            results["parallel_independent"], outcomes["parallel_independent"] = measure(
                llm, lambda: independent(llm, workload, args.n, args.seed))
        if "beam-search" in modes and not reuse_baseline:
            results["beam_independent"], _ = measure(
                llm, lambda: independent_by_length(llm, workload, args.beam_width, args.seed))
    if reuse_baseline and "beam-search" in modes:
        results["beam_independent"] = {**results["parallel_independent"],
                                       "reused_from": "parallel_sampling.independent"}

    record = base_record("memory", "pagedllm", model_label(args.model), workload.summary(), device_name(device),
                         _config(args, model_config.dtype, device, modes))
    runs = [figures for key, figures in results.items() if "reused_from" not in figures]
    record.update(throughput_figures(len(workload.requests), workload.num_prompt_tokens,
                                     sum(r["output_tokens"] for r in runs), sum(r["elapsed_s"] for r in runs)))
    record.update({"num_kv_blocks": num_blocks, "block_size": args.block_size,
                   "num_preemptions": sum(r["num_preemptions"] for r in runs)})
    if "parallel-sampling" in modes:
        sharing, baseline = results["parallel_sampling"], results["parallel_independent"]
        record["parallel_sampling"] = {
            "n": args.n, "sharing": sharing, "independent": baseline,
            "blocks_saved_pct": blocks_saved_pct(sharing, baseline),
            "identical_sequences": _num_identical(outcomes["parallel_sampling"], outcomes["parallel_independent"]),
        }
    if "beam-search" in modes:
        sharing, baseline = results["beam_search"], results["beam_independent"]
        record["beam_search"] = {
            "beam_width": args.beam_width, "length_penalty": args.length_penalty, "sharing": sharing,
            "independent": baseline, "blocks_saved_pct": blocks_saved_pct(sharing, baseline),
        }
    return record


@contextlib.contextmanager
def _engine(model_dir: str, args: argparse.Namespace, workload: Workload, prefix_caching: bool) -> Iterator[Any]:
    """An engine for one side of the comparison, warmed up, and released afterwards (one engine at a time, so the
    second one gets the same memory as the first)."""
    from pagedllm.entrypoints.llm import LLM

    llm = LLM(model_dir, skip_tokenizer_init=True, **{**engine_kwargs(args), "enable_prefix_caching": prefix_caching})
    try:
        warm_up(llm, workload)
        yield llm
    finally:
        device = llm.llm_engine.config.device
        del llm
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _num_identical(a: Outcome, b: Outcome) -> dict[str, int]:
    pairs = [(x, y) for per_a, per_b in zip(a.sequences, b.sequences) for x, y in zip(per_a, per_b)]
    return {"identical": sum(x == y for x, y in pairs), "compared": len(pairs)}


def _config(args: argparse.Namespace, dtype: str, device: str, modes: list[str]) -> dict[str, Any]:
    return {**engine_kwargs(args), "dtype": dtype, "device": device, "model_dir": resolve_model(args.model),
            "modes": modes, "n": args.n, "beam_width": args.beam_width, "length_penalty": args.length_penalty,
            "enable_prefix_caching": {"sharing": True, "independent": False}, "limit": args.limit}


def print_summary(record: dict[str, Any]) -> None:
    print(f"\nKV blocks in use: {record['model']} on {record['device']}, workload {record['workload']['name']} "
          f"({record['num_requests']} prompts), pool of {record['num_kv_blocks']} blocks of {record['block_size']} "
          "tokens")
    rows = []
    for key, label in (("parallel_sampling", f"parallel sampling n={record['config']['n']}"),
                       ("beam_search", f"beam search width={record['config']['beam_width']}")):
        if key not in record:
            continue
        section, saved = record[key], record[key]["blocks_saved_pct"]
        for side in ("sharing", "independent"):
            figures = section[side]
            rows.append([f"{label}: {side}", figures["mean_blocks"], figures["peak_blocks"],
                         figures["mean_shared_blocks"], figures["num_steps"], figures["num_preemptions"],
                         saved["mean"] if side == "sharing" else None, saved["peak"] if side == "sharing" else None])
    print(format_table(["run", "mean blocks", "peak blocks", "mean shared", "steps", "preemptions", "saved % (mean)",
                        "saved % (peak)"], rows))
    if "parallel_sampling" in record:
        same = record["parallel_sampling"]["identical_sequences"]
        print(f"parallel sampling: {same['identical']} of {same['compared']} sequences identical to their "
              "independent twin (same seed)")
    if record["num_preemptions"]:
        print(f"warning: {record['num_preemptions']} preemptions: the pool capped the blocks in use; give the KV "
              "cache more room (--kv-cache-memory-bytes or --num-gpu-blocks-override) for a fair comparison")


def main(args: argparse.Namespace) -> int:
    record = run_memory(args)
    print_summary(record)
    write_record(record, args.output_json)
    return 0
