"""``bench throughput --structured-fraction F``: the cost of structured outputs.

A fraction of the workload's requests (spread evenly) carries ``BENCH_SCHEMA``, a fixed, moderately complex JSON
schema; grammars need a vocabulary, so the engine loads a tokenizer (``--tokenizer``, or the model's own) even with
random weights. A constrained request ends when its grammar completes, usually before its max_tokens, so the
constrained run generates fewer tokens than the workload asks for. To compare like with like, the same prompts
then run unconstrained with each request's max_tokens set to what it generated in the constrained run (and
``ignore_eos``): both runs produce exactly the same number of output tokens, and the throughput loss is the
difference in output tokens/s. The matched run's prompts start with different token ids, so that it cannot hit
the prefix cache the constrained run filled. This happens in ``NUM_ROUNDS`` rounds (each on prompts of its own),
and the loss compares the best constrained run with the best matched run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from pagedllm.bench.engine_runner import (
    EngineRun,
    _kv_usage_probe,
    _ttft_s,
    counter_values,
    engine_device,
    engine_kwargs,
)
from pagedllm.bench.engine_runner import build_llm as build_llm_without_tokenizer
from pagedllm.bench.record import throughput_figures
from pagedllm.bench.workloads import Workload, max_token_id

# Nested objects, an array of objects, enums, integer and number ranges, bounded strings and a pattern: a grammar of
# the kind real extraction prompts carry. Bounded lengths keep random-weight outputs finite.
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,10}\\.(com|org|net)$"},
        "status": {"enum": ["active", "suspended", "closed"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 32},
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["US", "FR", "DE", "JP", "BR"]},
            },
            "required": ["street", "city", "zip", "country"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["new", "vip", "trial", "b2b", "churn-risk"]}, "maxItems": 5},
        "orders": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "paid": {"type": "boolean"},
                },
                "required": ["sku", "quantity", "paid"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "name", "email", "status", "score", "address", "tags", "orders"],
    "additionalProperties": False,
}


def structured_flags(num_requests: int, fraction: float) -> list[bool]:
    """Which requests carry the schema: ``round(fraction * num_requests)`` of them, spread evenly (request i is
    constrained when the running count ``floor((i + 1) * fraction)`` steps up)."""
    return [int((i + 1) * fraction) > int(i * fraction) for i in range(num_requests)]


def check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--structured-fraction must lie in [0, 1], got {fraction}")


def build_llm(model_dir: str, args: argparse.Namespace):
    """The bench engine; with a tokenizer when structured outputs need one (``--tokenizer``, else the model's) or
    when one is given."""
    if getattr(args, "structured_fraction", 0.0) == 0.0 and args.tokenizer is None:
        return build_llm_without_tokenizer(model_dir, args)
    from pagedllm.entrypoints.llm import LLM

    return LLM(model_dir, **engine_kwargs(args))


def sampling_params(workload: Workload, flags: list[bool], max_tokens: list[int] | None = None) -> list:
    """The run's SamplingParams: the workload's, the schema on flagged requests, max_tokens per request."""
    from pagedllm.params import SamplingParams, StructuredOutputsParams

    max_tokens = max_tokens or [request.max_tokens for request in workload.requests]
    return [SamplingParams(temperature=workload.temperature, ignore_eos=workload.ignore_eos, max_tokens=num_tokens,
                           structured_outputs=StructuredOutputsParams(json=BENCH_SCHEMA) if flag else None)
            for flag, num_tokens in zip(flags, max_tokens)]


def warm_up_schema(llm, workload: Workload) -> float:
    """Before timing, compile the schema (grammars are cached) and generate a few tokens under it, in batches of
    constrained and free rows (32 and 7 rows: Triton compiles a kernel anew for row counts divisible by 16), so that
    the kernels of the sampler's grammar paths are compiled too (as the warm-up does for the unconstrained path): the
    seconds it took, reported on its own."""
    from pagedllm.params import SamplingParams, StructuredOutputsParams

    start = time.perf_counter()
    structured = StructuredOutputsParams(json=BENCH_SCHEMA)
    llm.llm_engine.input_processor.structured_output_manager.prepare(structured).result()
    kinds = [SamplingParams(temperature=workload.temperature, max_tokens=32, ignore_eos=True, structured_outputs=s)
             for s in (structured, None)]
    for batch_size in (32, 7):
        params = [kinds[i % 2] for i in range(batch_size)]
        llm.generate([{"prompt_token_ids": [1, 2, 3]}] * batch_size, params, use_tqdm=False)
    return time.perf_counter() - start


def timed_generate(llm, prompts: list[list[int]], params: list) -> tuple[EngineRun, list[int]]:
    """One timed ``generate`` as ``engine_runner.run_workload`` does it, with these params; also each request's
    number of output tokens."""
    from pagedllm.bench.device import synchronize

    before = counter_values(llm)
    device = engine_device(llm)
    with _kv_usage_probe(llm) as peak:
        synchronize(device)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        synchronize(device)
        elapsed = time.perf_counter() - start
    delta = {name: int(value - before[name]) for name, value in counter_values(llm).items()}
    lengths = [sum(len(c.token_ids) for c in output.outputs) for output in outputs]
    run = EngineRun(
        elapsed_s=elapsed, num_requests=len(outputs), prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        output_tokens=sum(lengths), peak_kv_cache_usage=peak[0], num_preemptions=delta["num_preemptions_total"],
        prefix_cache_queries=delta["prefix_cache_queries_total"], prefix_cache_hits=delta["prefix_cache_hits_total"],
        ttfts_s=tuple(ttft for ttft in map(_ttft_s, outputs) if ttft is not None))
    return run, lengths


def fresh_prompts(workload: Workload, key: int = 0) -> list[list[int]]:
    """The prompts with their first id swapped for one no workload prompt starts with (equal first ids stay equal,
    so prefix sharing inside the workload is kept): no block of an earlier run can be hit. Each ``key`` gives
    other first ids."""
    first_ids = sorted({r.prompt_token_ids[0] for r in workload.requests if r.prompt_token_ids})
    taken = set(first_ids)
    unused = (t for t in range(max_token_id(workload) + (key + 1) * len(first_ids) + 1) if t not in taken)
    for _ in range(key * len(first_ids)):
        next(unused)
    swap = {first: next(unused) for first in first_ids}
    return [[swap[r.prompt_token_ids[0]], *r.prompt_token_ids[1:]] if r.prompt_token_ids else []
            for r in workload.requests]


# Rounds of (constrained run, matched run); the loss compares the best of each, so that a one-off stall of either
# run (seen: up to 16% between identical runs on one GPU) does not decide it. Every round is in the record.
NUM_ROUNDS = 4


def run_round(llm, workload: Workload, flags: list[bool], round_index: int) -> dict[str, Any]:
    """One constrained run and its matched unconstrained run, on prompts no earlier run has cached."""
    if round_index == 0:
        prompts = [r.prompt_token_ids for r in workload.requests]
    else:
        prompts = fresh_prompts(workload, 2 * round_index - 1)
    draws_before = grammar_draws(llm)
    constrained, lengths = timed_generate(llm, prompts, sampling_params(workload, flags))
    draws = {name: count - draws_before.get(name, 0) for name, count in grammar_draws(llm).items()}
    matched, _ = timed_generate(llm, fresh_prompts(workload, 2 * round_index), sampling_params(
        dataclasses.replace(workload, ignore_eos=True),  # exactly the constrained run's token counts
        [False] * len(flags), [max(n, 1) for n in lengths]))
    return {"constrained": constrained, "lengths": lengths, "draws": draws, "matched": matched}


def _figures(run: EngineRun) -> dict[str, Any]:
    return throughput_figures(run.num_requests, run.prompt_tokens, run.output_tokens, run.elapsed_s)


def run_structured(llm, workload: Workload, fraction: float) -> tuple[EngineRun, dict[str, Any]]:
    """The best constrained run (the record's main figures) and the ``structured_outputs`` section: the split of its
    output tokens, the best matched unconstrained run, the throughput loss between the two, and every round."""
    flags = structured_flags(len(workload.requests), fraction)
    warmup_s = warm_up_schema(llm, workload) if any(flags) else 0.0
    rounds = [run_round(llm, workload, flags, index) for index in range(NUM_ROUNDS)]
    best = max(rounds, key=lambda r: _figures(r["constrained"])["output_tokens_per_s"])
    constrained, lengths, draws = best["constrained"], best["lengths"], best["draws"]
    matched = max((r["matched"] for r in rounds), key=lambda run: _figures(run)["output_tokens_per_s"])
    constrained_figures, matched_figures = _figures(constrained), _figures(matched)
    section = {
        "fraction": fraction,
        "schema": BENCH_SCHEMA,
        "num_structured_requests": sum(flags),
        "structured_output_tokens": sum(n for n, flag in zip(lengths, flags) if flag),
        "unstructured_output_tokens": sum(n for n, flag in zip(lengths, flags) if not flag),
        "requested_output_tokens": workload.num_output_tokens,
        "schema_warmup_s": warmup_s,
        "grammar_draws": draws,
        "matched_unconstrained": {**matched_figures, "prefix_cache_hits": matched.prefix_cache_hits},
        "throughput_loss": 1.0 - constrained_figures["output_tokens_per_s"] / matched_figures["output_tokens_per_s"],
        "rounds": [{"constrained": _figures(r["constrained"]), "matched_unconstrained": _figures(r["matched"]),
                    "grammar_draws": r["draws"]} for r in rounds],
    }
    return constrained, section


def grammar_draws(llm) -> dict[str, int]:
    """The runner's count of draws under a grammar so far: masked before the draw, checked after it, and of those
    drawn again with the mask (``worker/grammar_sampling.py``); empty before the first."""
    grammar_sampling = llm.llm_engine.engine_core.model_runner.grammar_sampling
    if grammar_sampling is None:
        return {}
    return {"masked": grammar_sampling.num_masked, "checked": grammar_sampling.num_checked,
            "redrawn": grammar_sampling.num_redrawn}


def summary_lines(section: dict[str, Any]) -> list[str]:
    matched = section["matched_unconstrained"]
    draws = section.get("grammar_draws") or {}
    return [
        (f"structured outputs: {section['num_structured_requests']} requests ({100 * section['fraction']:.0f}%) with "
        f"the bench JSON schema (compiled and warmed up in {section['schema_warmup_s']:.2f} s before timing); they generated "
        f"{section['structured_output_tokens']:,} tokens, the others {section['unstructured_output_tokens']:,} "
        f"(asked for {section['requested_output_tokens']:,} in all)"),
        (f"draws under the grammar: {draws.get('masked', 0):,} masked first, {draws.get('checked', 0):,} checked after "
        f"the draw ({draws.get('redrawn', 0):,} of them drawn again with the mask)"),
        (f"matched unconstrained run (same prompts, max_tokens = tokens generated above): "
        f"{matched['output_tokens_per_s']:,.1f} output tok/s over {matched['output_tokens']:,} tokens; throughput "
        f"loss with constraints {100 * section['throughput_loss']:.1f}% (best of {len(section['rounds'])} rounds: "
        + ", ".join(f"{r['constrained']['output_tokens_per_s']:,.0f} vs {r['matched_unconstrained']['output_tokens_per_s']:,.0f}"
                    for r in section["rounds"]) + " tok/s)"),
    ]
