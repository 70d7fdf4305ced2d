"""Admission control under overload, against a running server (loopback): the time per output token (TPOT) of the
requests it accepts at 3x its capacity, compared with the unloaded TPOT, plus the 429s, their Retry-After and the
requests dropped at the queue delay. The issue's bar: accepted TPOT within 20% of unloaded.

    pagedllm serve MODEL --max-num-seqs 8 --max-num-waiting 8 --max-queue-delay-ms 2000 --port 8011 &
    python benchmarks/scripts/admission_load.py --url http://127.0.0.1:8011 --capacity 16 --delay-ms 2000

--capacity: the requests the server holds at once (--max-num-seqs + --max-num-waiting). Prints one JSON record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def one_stream(client: httpx.AsyncClient, max_tokens: int) -> dict:
    body = {"prompt": "Tell me a long story about", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start, token_times, error = time.monotonic(), [], None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code, "retry_after": response.headers.get("retry-after")}
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["code"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    token_times.append(time.monotonic())
    result = {"status": 200, "error": error, "ttft_s": token_times[0] - start if token_times else None}
    if len(token_times) > 1:  # chunks, not tokens, when the server merges: the pace is what the client sees
        result["tpot_s"] = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    return result


async def run(args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=args.url, timeout=300) as client:
        unloaded = [await one_stream(client, args.max_tokens) for _ in range(args.unloaded_requests)]
        start, loaded = time.monotonic(), []
        for _ in range(args.waves):
            loaded += await asyncio.gather(*(one_stream(client, args.max_tokens) for _ in range(3 * args.capacity)))
        duration = time.monotonic() - start
    return summarize(unloaded, loaded, duration, args.delay_ms / 1000)


def summarize(unloaded: list[dict], loaded: list[dict], duration_s: float, delay_s: float) -> dict:
    served = [r for r in loaded if r["status"] == 200 and r["error"] is None and "tpot_s" in r]
    base = statistics.median(r["tpot_s"] for r in unloaded if "tpot_s" in r)
    loaded_tpot = statistics.median(r["tpot_s"] for r in served) if served else None
    return {
        "num_requests": len(loaded), "duration_s": round(duration_s, 2), "num_served": len(served),
        "num_429": sum(r["status"] == 429 for r in loaded),
        "retry_after_values": sorted({r["retry_after"] for r in loaded if r["status"] == 429}),
        "num_queue_timeouts": sum(r.get("error") == "queue_timeout" for r in loaded),
        "max_ttft_served_s": max((r["ttft_s"] for r in served), default=None), "queue_delay_s": delay_s,
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
