"""``bench serve``: replays a workload against any OpenAI-compatible server over streaming ``/v1/completions``,
with Poisson arrivals at ``--request-rate`` (or all at once) under an optional ``--max-concurrency``."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from pagedllm.bench.common import workload_from_args
from pagedllm.bench.record import base_record, format_table, throughput_figures, write_record
from pagedllm.bench.serve_metrics import RequestResult, compute_metrics, parse_goodput
from pagedllm.bench.workloads import Workload

# Common English words, each one token in the usual BPE vocabularies: text prompts of about N tokens without a
# tokenizer (``--prompt-format text``); give ``--tokenizer`` to decode the workload's token ids instead.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his",
    "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all",
    "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their",
    "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would",
    "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way",
    "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now", "find", "long",
    "down", "day", "did", "get", "come", "made", "may", "part",
)


def prompts_for(workload: Workload, prompt_format: str, tokenizer: str | None) -> list[list[int] | str]:
    if prompt_format == "token-ids":
        return [r.prompt_token_ids for r in workload.requests]
    if tokenizer:
        from transformers import AutoTokenizer

        decoder = AutoTokenizer.from_pretrained(tokenizer)
        return [decoder.decode(r.prompt_token_ids) for r in workload.requests]
    return [" ".join(_WORDS[i % len(_WORDS)] for i in r.prompt_token_ids) for r in workload.requests]


@dataclass
class PlannedRequest:
    """One request of the replay, ready to send: its place in the workload, when it arrives (seconds after the
    start) and its body."""

    index: int
    arrival_s: float
    payload: dict[str, Any]
    prompt_len: int


def check_num_clients(num_clients: int, max_concurrency: int | None) -> None:
    """``--num-clients`` must be positive, and split ``--max-concurrency`` evenly (each client keeps its share)."""
    if num_clients < 1:
        raise ValueError(f"--num-clients must be at least 1, got {num_clients}")
    if max_concurrency and max_concurrency % num_clients:
        raise ValueError(f"--max-concurrency {max_concurrency} is not a multiple of --num-clients {num_clients}: "
                         "each client keeps its share of the limit")


def arrival_offsets(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """When each request arrives, in seconds after the first: exponential gaps (a Poisson process) at
    ``request_rate``; all at 0 for inf."""
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        if math.isfinite(request_rate):
            now += rng.expovariate(request_rate)
    return offsets


def plan_requests(args: argparse.Namespace, workload: Workload, model: str,
                  prompts: list[list[int] | str]) -> list[PlannedRequest]:
    offsets = arrival_offsets(len(prompts), args.request_rate, args.seed)
    return [PlannedRequest(index, offsets[index], {
        "model": model, "prompt": prompts[index], "max_tokens": request.max_tokens,
        "temperature": workload.temperature, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": workload.ignore_eos}, len(request.prompt_token_ids))
        for index, request in enumerate(workload.requests)]


async def stream_completion(client, url: str, payload: dict[str, Any], headers: dict[str, str],
                            prompt_len: int) -> RequestResult:
    """Send one streaming completion request and time its chunks."""
    import httpx

    result = RequestResult(prompt_tokens=prompt_len)
    start = time.perf_counter()
    last = start
    num_chunks = 0
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):  # blank separators, ":" comments, "event:" lines
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    num_chunks += 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, OSError, ValueError) as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency_s = last - start
    # Token counts from the server's usage when it sends one; else one token per streamed chunk.
    result.output_tokens = int(usage.get("completion_tokens") or num_chunks)
    result.prompt_tokens = int(usage.get("prompt_tokens") or prompt_len)
    result.success = num_chunks > 0
    if not result.success:
        result.error = "the stream carried no completion chunk"
    return result


async def replay(args: argparse.Namespace, planned: list[PlannedRequest], start_at: float,
                 max_concurrency: int | None, show_progress: bool) -> tuple[list[RequestResult], float]:
    """Send each planned request at ``start_at`` (``time.monotonic()``) plus its arrival; the results in
    ``planned``'s order and when the last one ended."""
    import httpx
    from tqdm.auto import tqdm

    url = args.base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    progress = tqdm(total=len(planned), desc="Requests", disable=not show_progress, dynamic_ncols=True)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    connections = httpx.Limits(max_connections=max_concurrency or None, max_keepalive_connections=None)

    async def one(client, request: PlannedRequest) -> RequestResult:
        if limit is None:
            result = await stream_completion(client, url, request.payload, headers, request.prompt_len)
        else:
            async with limit:
                result = await stream_completion(client, url, request.payload, headers, request.prompt_len)
        progress.update(1)
        return result

    async with httpx.AsyncClient(timeout=timeout, limits=connections) as client:
        tasks = []
        for request in planned:
            await asyncio.sleep(max(0.0, start_at + request.arrival_s - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, request)))
        results = await asyncio.gather(*tasks)
        end = time.monotonic()
    progress.close()
    return list(results), end


def run_requests(args: argparse.Namespace, planned: list[PlannedRequest]) -> tuple[list[RequestResult], float]:
    """Replay ``planned`` from this process, or from ``--num-clients`` processes; the results in order and the
    duration from the start to the last request's end."""
    if args.num_clients > 1:
        from pagedllm.bench.serve_clients import replay_in_processes

        return replay_in_processes(args, planned)
    start = time.monotonic()
    results, end = asyncio.run(replay(args, planned, start, args.max_concurrency, not args.disable_tqdm))
    return results, end - start


def served_model_name(base_url: str, api_key: str | None) -> str:
    """The first model the server lists at ``/v1/models``."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


def run_serve(args: argparse.Namespace) -> dict[str, Any]:
    slos = parse_goodput(args.goodput)
    check_num_clients(args.num_clients, args.max_concurrency)
    workload = workload_from_args(args)
    model = args.model or served_model_name(args.base_url, args.api_key)
    prompts = prompts_for(workload, args.prompt_format, args.tokenizer)
    print(f"[bench] {len(prompts)} requests to {args.base_url}{args.endpoint} (model {model}), request rate "
          f"{args.request_rate}, max concurrency {args.max_concurrency or 'unbounded'}, {args.num_clients} client "
          f"process(es)", flush=True)
    results, duration = run_requests(args, plan_requests(args, workload, model, prompts))
    metrics = compute_metrics(results, duration, slos, args.metric_percentiles)
    record = base_record("serve", args.label, model, workload.summary(), args.device_label, {
        "base_url": args.base_url, "endpoint": args.endpoint, "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency, "num_clients": args.num_clients, "prompt_format": args.prompt_format,
        "seed": args.seed,
        "goodput": slos, "limit": args.limit})
    record.update(throughput_figures(metrics["completed"], metrics["total_input_tokens"],
                                     metrics["total_output_tokens"], duration))
    errors = sorted({r.error for r in results if not r.success})
    record.update({"request_rate": args.request_rate, "max_concurrency": args.max_concurrency, "metrics": metrics,
                   "errors": errors[:10]})
    return record


def print_summary(record: dict[str, Any]) -> None:
    metrics = record["metrics"]
    print(f"\nServing: {record['engine']} ({record['model']}), {metrics['completed']} completed, "
          f"{metrics['failed']} failed in {metrics['duration_s']:.2f} s")
    print(f"request throughput {metrics['request_throughput']:.2f} req/s, output {metrics['output_throughput']:.1f} "
          f"tok/s, total {metrics['total_token_throughput']:.1f} tok/s")
    if "request_goodput" in metrics:
        print(f"goodput {metrics['request_goodput']:.2f} req/s ({metrics['good_requests']} requests met "
              f"{metrics['goodput_slos_ms']})")
    keys = [k for k in metrics["ttft_ms"] if k != "std"]
    rows = [[name.upper(), *(metrics[f"{name}_ms"][k] for k in keys)] for name in ("ttft", "tpot", "itl", "e2el")]
    print(format_table(["ms", *keys], rows))
    for error in record["errors"]:
        print(f"error: {error}")


def main(args: argparse.Namespace) -> int:
    record = run_serve(args)
    print_summary(record)
    write_record(record, args.output_json)
    return 0 if record["metrics"]["completed"] else 1
