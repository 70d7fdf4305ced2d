"""Engine metrics with vLLM's names under the ``pagedllm:`` prefix, readable through ``LLM.get_metrics()``."""

from __future__ import annotations

from collections import Counter as TallyCounter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.core.scheduler import SchedulerStats

if TYPE_CHECKING:
    from pagedllm.engine.processing import _RequestState

PREFIX = "pagedllm:"


@dataclass(frozen=True)
class Metric:
    """One metric sample: a counter (monotonic total) or a gauge (current value)."""

    name: str
    kind: str  # "counter" | "gauge"
    value: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineMetrics:
    """Counters updated by the engine as requests progress, plus the scheduler's latest gauges."""

    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    finished_by_reason: TallyCounter = field(default_factory=TallyCounter)
    # Sums and counts (histogram buckets arrive with the Prometheus endpoint): no per-request growth.
    time_to_first_token_seconds: _SumCount = field(default_factory=lambda: _SumCount())
    e2e_request_latency_seconds: _SumCount = field(default_factory=lambda: _SumCount())
    scheduler: SchedulerStats = field(default_factory=SchedulerStats)

    def record_step(self, stats: SchedulerStats) -> None:
        self.scheduler = stats

    def record_first_token(self, state: _RequestState) -> None:
        """Called once per request, when its first token arrives: its prompt has been computed."""
        self.prompt_tokens_total += len(state.processed.prompt_token_ids)
        metrics = state.metrics
        self.time_to_first_token_seconds.add(metrics.first_token_time - metrics.arrival_time)

    def record_finished(self, state: _RequestState) -> None:
        for sequence in state.sequences.values():
            self.finished_by_reason[sequence.finish_reason] += 1
        metrics = state.metrics
        self.e2e_request_latency_seconds.add(metrics.finished_time - metrics.arrival_time)

    def snapshot(self) -> list[Metric]:
        stats = self.scheduler
        metrics = [
            Metric(PREFIX + "num_requests_running", "gauge", stats.num_running),
            Metric(PREFIX + "num_requests_waiting", "gauge", stats.num_waiting),
            Metric(PREFIX + "kv_cache_usage_perc", "gauge", stats.kv_cache_usage),
            Metric(PREFIX + "num_preemptions_total", "counter", stats.num_preemptions_total),
            Metric(PREFIX + "prompt_tokens_total", "counter", self.prompt_tokens_total),
            Metric(PREFIX + "generation_tokens_total", "counter", self.generation_tokens_total),
        ]
        for reason in ("stop", "length", "abort"):
            metrics.append(
                Metric(PREFIX + "request_success_total", "counter", self.finished_by_reason[reason], {"finished_reason": reason})
            )
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
            tally = getattr(self, name)
            metrics.append(Metric(PREFIX + name + "_sum", "counter", tally.total))
            metrics.append(Metric(PREFIX + name + "_count", "counter", tally.count))
        return metrics


@dataclass
class _SumCount:
    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1
