"""Admission control under overload, against a running server (loopback): the time per output token (TPOT) of the
requests it accepts at 3x its capacity, compared with the unloaded TPOT, plus the 429s, their Retry-After, how long
any request waited for its answer (a refusal or its first token) and the requests dropped at the queue delay, and
the running / waiting requests and KV-cache usage once the burst is over. The issue's bars: accepted TPOT within 20%
of unloaded, no wait past the queue delay, everything back to zero.

    pagedllm serve MODEL --max-num-seqs 8 --max-num-waiting 8 --max-queue-delay-ms 2000 --port 8011 &
    python benchmarks/scripts/admission_load.py --url http://127.0.0.1:8011 --capacity 16 --delay-ms 2000

--capacity: the requests the server holds at once (--max-num-seqs + --max-num-waiting). Prints one JSON record.
TPOT is vLLM's: (last token - first token) / (completion tokens - 1), the tokens counted by the stream's usage (a
chunk may carry several tokens when the client lags).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

GAUGES = ("pagedllm:num_requests_running", "pagedllm:num_requests_waiting", "pagedllm:kv_cache_usage_perc")


async def one_stream(client: httpx.AsyncClient, max_tokens: int) -> dict:
    body = {"prompt": "Tell me a long story about", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, token_times, tokens, error = time.monotonic(), [], 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code, "retry_after": response.headers.get("retry-after"),
                    "answered_s": time.monotonic() - start}
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["code"]
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    token_times.append(time.monotonic())
    result = {"status": 200, "error": error, "ttft_s": token_times[0] - start if token_times else None}
    if len(token_times) > 1 and tokens > 1:
        result["tpot_s"] = (token_times[-1] - token_times[0]) / (tokens - 1)
    return result


async def gauges_once_idle(client: httpx.AsyncClient, timeout_s: float = 15.0) -> dict:
    """Running and waiting requests and KV-cache usage (summed over engines) once all are 0, or after timeout_s."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        values = dict.fromkeys(GAUGES, 0.0)
        for family in text_string_to_metric_families((await client.get("/metrics")).text):
            for sample in family.samples:
                if sample.name in values:
                    values[sample.name] += sample.value
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=args.url, timeout=300) as client:
        unloaded = [await one_stream(client, args.max_tokens) for _ in range(args.unloaded_requests)]
        start, loaded = time.monotonic(), []
        for _ in range(args.waves):
            loaded += await asyncio.gather(*(one_stream(client, args.max_tokens) for _ in range(3 * args.capacity)))
        duration = time.monotonic() - start
        after = await gauges_once_idle(client)
    return {**summarize(unloaded, loaded, duration, args.delay_ms / 1000), "after_burst": after,
            "back_to_zero": not any(after.values())}


def summarize(unloaded: list[dict], loaded: list[dict], duration_s: float, delay_s: float) -> dict:
    served = [r for r in loaded if r["status"] == 200 and r["error"] is None and "tpot_s" in r]
    base = statistics.median(r["tpot_s"] for r in unloaded if "tpot_s" in r)
    loaded_tpot = statistics.median(r["tpot_s"] for r in served) if served else None
    waits = [r["answered_s"] if r["status"] != 200 else r["ttft_s"] for r in loaded]
    waits = [wait for wait in waits if wait is not None]  # a request dropped at the delay has no first token
    return {
        "num_requests": len(loaded), "duration_s": round(duration_s, 2), "num_served": len(served),
        "num_429": sum(r["status"] == 429 for r in loaded),
        "retry_after_values": sorted({r["retry_after"] for r in loaded if r["status"] == 429}),
        "num_queue_timeouts": sum(r.get("error") == "queue_timeout" for r in loaded),
        "max_ttft_served_s": max((r["ttft_s"] for r in served), default=None),
        "max_refusal_s": max((r["answered_s"] for r in loaded if r["status"] != 200), default=None),
        "queue_delay_s": delay_s, "max_wait_within_delay": max(waits, default=0.0) <= delay_s,
        "tpot_unloaded_s": base, "tpot_loaded_median_s": loaded_tpot,
        "tpot_ratio": loaded_tpot / base if loaded_tpot else None,
        "tpot_within_20pct": loaded_tpot is not None and loaded_tpot <= 1.2 * base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--capacity", type=int, required=True, help="--max-num-seqs + --max-num-waiting")
    parser.add_argument("--delay-ms", type=float, required=True, help="the server's --max-queue-delay-ms")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--unloaded-requests", type=int, default=5)
    parser.add_argument("--waves", type=int, default=5)
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=1))


if __name__ == "__main__":
    main()
