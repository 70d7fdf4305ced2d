"""Engine metrics with vLLM's names under the ``pagedllm:`` prefix.

The engine keeps plain counters, gauges and fixed-bucket histograms (no per-request growth, no exporter
dependency); ``snapshot()`` turns them into ``Metric`` samples, read by ``LLM.get_metrics()`` and exported to
Prometheus by the server at scrape time.
"""

from __future__ import annotations

import bisect
from collections import Counter as TallyCounter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.core.interface import SchedulerStats

if TYPE_CHECKING:
    from pagedllm.engine.output_processor import _RequestState

PREFIX = "pagedllm:"

# Bucket upper bounds in seconds, as vLLM uses for the same histograms.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass(frozen=True)
class Metric:
    """One metric: a counter (monotonic total), a gauge (current value) or a histogram (``value`` = sum)."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    value: float
    labels: dict[str, str] = field(default_factory=dict)
    count: int = 0  # histograms: number of observations
    buckets: tuple[tuple[float, int], ...] = ()  # histograms: (upper bound, cumulative count), +Inf last


class Histogram:
    """Fixed buckets: constant memory whatever the number of observations."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last bucket is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def metric(self, name: str) -> Metric:
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            cumulative.append((bound, running))
        return Metric(name, "histogram", self.total, count=self.count, buckets=tuple(cumulative))


@dataclass
class EngineMetrics:
    """Updated by the engine as requests progress, plus the scheduler's latest gauges."""

    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    finished_by_reason: TallyCounter = field(default_factory=TallyCounter)
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(_TTFT_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(_ITL_BUCKETS))
    e2e_request_latency: Histogram = field(default_factory=lambda: Histogram(_REQUEST_BUCKETS))
    request_queue_time: Histogram = field(default_factory=lambda: Histogram(_REQUEST_BUCKETS))
    scheduler: SchedulerStats = field(default_factory=SchedulerStats)

    def record_step(self, stats: SchedulerStats) -> None:
        self.scheduler = stats

    def record_first_token(self, state: _RequestState) -> None:
        """Called once per request, when its first token arrives: its prompt has been computed."""
        self.prompt_tokens_total += len(state.processed.prompt_token_ids)
        metrics = state.metrics
        self.time_to_first_token.observe(metrics.first_token_time - metrics.arrival_time)
        self.request_queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)

    def record_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def record_finished(self, state: _RequestState) -> None:
        for sequence in state.sequences.values():
            self.finished_by_reason[sequence.finish_reason] += 1
        metrics = state.metrics
        self.e2e_request_latency.observe(metrics.finished_time - metrics.arrival_time)

    def record_aborted(self, num_sequences: int) -> None:
        self.finished_by_reason["abort"] += num_sequences

    def snapshot(self) -> list[Metric]:
        stats = self.scheduler
        metrics = [
            Metric(PREFIX + "num_requests_running", "gauge", stats.num_running),
            Metric(PREFIX + "num_requests_waiting", "gauge", stats.num_waiting),
            Metric(PREFIX + "kv_cache_usage_perc", "gauge", stats.kv_cache_usage),
            Metric(PREFIX + "num_preemptions_total", "counter", stats.num_preemptions_total),
            Metric(PREFIX + "kv_cache_shared_blocks", "gauge", stats.num_shared_blocks),
            Metric(PREFIX + "num_swap_preemptions_total", "counter", stats.num_swap_preemptions_total),
            Metric(PREFIX + "num_swapped_out_blocks_total", "counter", stats.num_swapped_out_blocks_total),
            Metric(PREFIX + "cpu_kv_cache_usage_perc", "gauge", stats.cpu_kv_cache_usage),
            Metric(PREFIX + "prefix_cache_queries_total", "counter", stats.prefix_cache_queries),
            Metric(PREFIX + "prefix_cache_hits_total", "counter", stats.prefix_cache_hits),
            Metric(PREFIX + "prompt_tokens_total", "counter", self.prompt_tokens_total),
            Metric(PREFIX + "generation_tokens_total", "counter", self.generation_tokens_total),
        ]
        for reason in ("stop", "length", "abort"):
            count = self.finished_by_reason[reason]
            metrics.append(Metric(PREFIX + "request_success_total", "counter", count, {"finished_reason": reason}))
        metrics += [
            self.time_to_first_token.metric(PREFIX + "time_to_first_token_seconds"),
            self.inter_token_latency.metric(PREFIX + "inter_token_latency_seconds"),
            self.e2e_request_latency.metric(PREFIX + "e2e_request_latency_seconds"),
            self.request_queue_time.metric(PREFIX + "request_queue_time_seconds"),
        ]
        return metrics
