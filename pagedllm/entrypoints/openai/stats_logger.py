"""The server's periodic stats line, as vLLM logs it: prompt and generation throughput since the previous line,
requests running and waiting, KV cache usage and prefix cache hit rate. One line every ``interval_s`` while there is
work (an idle server stays quiet); ``--disable-log-stats`` turns it off, ``PAGEDLLM_LOG_STATS_INTERVAL`` sets the
interval (10 s)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagedllm.engine.metrics import PREFIX, Metric

logger = logging.getLogger("pagedllm.stats")


@dataclass(frozen=True)
class _Totals:
    """The counters a line is a difference of, and when they were read."""

    at: float
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0


class StatsLogger:
    """Turns two readings of the engine's metrics into one line; ``run()`` logs one every ``interval_s``."""

    def __init__(self, get_metrics: Callable[[], list[Metric]], interval_s: float,
                 model_name: str | None = None) -> None:
        self._get_metrics = get_metrics
        self._prefix = "" if model_name is None else f"[{model_name}] "  # a server of several models: whose line
        self.interval_s = interval_s
        self._last = _Totals(time.monotonic())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            line = self.next_line(time.monotonic())
            if line is not None:
                logger.info("%s%s", self._prefix, line)

    def next_line(self, now: float) -> str | None:
        """The line for the period since the previous call, or None when the period had no work at all."""
        values = {metric.name: metric.value for metric in self._get_metrics() if not metric.labels}
        totals = _read_totals(values, now)
        last, self._last = self._last, totals
        running = values.get(PREFIX + "num_requests_running", 0)
        waiting = values.get(PREFIX + "num_requests_waiting", 0)
        if not (running or waiting or _computed_tokens(last, totals)):
            return None
        return format_line(last, totals, running, waiting, values.get(PREFIX + "kv_cache_usage_perc", 0.0))


def _computed_tokens(last: _Totals, now: _Totals) -> bool:
    return now.prompt_tokens > last.prompt_tokens or now.generation_tokens > last.generation_tokens


def _read_totals(values: dict[str, float], now: float) -> _Totals:
    return _Totals(now, values.get(PREFIX + "prompt_tokens_total", 0.0),
                   values.get(PREFIX + "generation_tokens_total", 0.0),
                   values.get(PREFIX + "prefix_cache_queries_total", 0.0),
                   values.get(PREFIX + "prefix_cache_hits_total", 0.0))


def format_line(last: _Totals, now: _Totals, running: float, waiting: float, kv_cache_usage: float) -> str:
    """vLLM's wording, so that log readers and dashboards built on it keep working."""
    seconds = max(now.at - last.at, 1e-9)
    queries = now.prefix_queries - last.prefix_queries
    hit_rate = (now.prefix_hits - last.prefix_hits) / queries if queries else 0.0
    return (f"Avg prompt throughput: {(now.prompt_tokens - last.prompt_tokens) / seconds:.1f} tokens/s, "
            f"Avg generation throughput: {(now.generation_tokens - last.generation_tokens) / seconds:.1f} tokens/s, "
            f"Running: {running:.0f} reqs, Waiting: {waiting:.0f} reqs, "
            f"KV cache usage: {kv_cache_usage * 100:.1f}%, Prefix cache hit rate: {hit_rate * 100:.1f}%")
