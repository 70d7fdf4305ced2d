"""Serving metrics with the definitions of vLLM's ``bench serve``.

- TTFT: from sending the request to the first streamed chunk carrying a choice.
- TPOT, per request: (E2E latency - TTFT) / (output tokens - 1), for requests of more than one output token.
- ITL: every gap between consecutive streamed chunks of a request, pooled over all requests.
- E2E latency: from sending the request to its last chunk carrying a choice.
- Goodput: completed requests per second that met every given SLO (TTFT, TPOT, E2E, in ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What the client saw of one streamed request (times in seconds)."""

    success: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> ``{"ttft": 200.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"Bad --goodput item {item!r}: expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"Bad --goodput value in {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] <= 0:
            raise ValueError(f"--goodput {name} must be positive, got {value}")
    return slos


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    values_ms = {"ttft": 1000 * result.ttft_s, "tpot": 1000 * (result.tpot_s or 0.0), "e2el": 1000 * result.latency_s}
    return all(values_ms[name] <= limit for name, limit in slos_ms.items())


def summarize(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean, median, std and the given percentiles, in milliseconds (zeros when there is no value)."""
    values = 1000 * np.asarray(values_s, dtype=float) if len(values_s) else np.zeros(1)
    summary = {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std())}
    for p in percentiles:
        summary[f"p{p:g}"] = float(np.percentile(values, p))
    return summary


def compute_metrics(results: Sequence[RequestResult], duration_s: float, slos_ms: dict[str, float],
                    percentiles: Sequence[float] = (99,)) -> dict[str, Any]:
    completed = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens for r in completed)
    output_tokens = sum(r.output_tokens for r in completed)
    percentiles = sorted({99.0, *map(float, percentiles)})  # the median is always there as "median"
    metrics: dict[str, Any] = {
        "completed": len(completed),
        "failed": len(results) - len(completed),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(completed) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": summarize([r.ttft_s for r in completed], percentiles),
        "tpot_ms": summarize([r.tpot_s for r in completed if r.tpot_s is not None], percentiles),
        "itl_ms": summarize([gap for r in completed for gap in r.itl_s], percentiles),
        "e2el_ms": summarize([r.latency_s for r in completed], percentiles),
    }
    if slos_ms:
        good = sum(meets_slos(r, slos_ms) for r in completed)
        metrics.update({"goodput_slos_ms": dict(slos_ms), "good_requests": good, "request_goodput": good / duration_s})
    return metrics
