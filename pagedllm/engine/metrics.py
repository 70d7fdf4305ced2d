"""Engine metrics with vLLM's names under the ``pagedllm:`` prefix.

The engine keeps plain counters, gauges and fixed-bucket histograms (no per-request growth, no exporter
dependency); ``snapshot()`` turns them into ``Metric`` samples, read by ``LLM.get_metrics()`` and exported to
Prometheus by the server at scrape time.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter as TallyCounter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.core.interface import SchedulerStats

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig
    from pagedllm.engine.output_processor import _RequestState

PREFIX = "pagedllm:"

# Bucket upper bounds in seconds, as vLLM uses for the same histograms.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
# Counts, as vLLM buckets them: tokens of one engine step, and n of a request.
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)


def one_two_five_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``largest``: vLLM's buckets of per-request token counts (up to max_model_len)."""
    bounds, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > largest:
                return tuple(bounds)
            bounds.append(mantissa * scale)
        scale *= 10


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


def cache_config_info(config: EngineConfig, startup_report: dict) -> dict[str, str]:
    """The labels of ``cache_config_info`` (vLLM's gauge of value 1): how the KV cache was configured and sized."""
    cache = config.cache_config
    return {
        "block_size": str(cache.block_size),
        "num_gpu_blocks": str(startup_report["num_gpu_blocks"]),
        "num_cpu_blocks": str(startup_report.get("num_cpu_blocks", 0)),
        "num_gpu_blocks_override": str(cache.num_gpu_blocks_override),
        "enable_prefix_caching": str(cache.enable_prefix_caching),
        "cache_dtype": cache.cache_dtype,
        "gpu_memory_utilization": str(cache.gpu_memory_utilization),
        "kv_cache_memory_bytes": str(cache.kv_cache_memory_bytes),
        "swap_space_bytes": str(cache.swap_space_bytes),
        "preemption_mode": config.scheduler_config.preemption_mode,
    }


@dataclass
class RequestHistograms:
    """vLLM's per-request histograms, observed once per finished request (not for aborted or failed ones)."""

    prompt_tokens: Histogram
    generation_tokens: Histogram  # all sequences of the request
    max_tokens_param: Histogram
    n_param: Histogram = field(default_factory=lambda: Histogram(_N_BUCKETS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(_ITL_BUCKETS))
    prefill_time: Histogram = field(default_factory=lambda: Histogram(_REQUEST_BUCKETS))
    decode_time: Histogram = field(default_factory=lambda: Histogram(_REQUEST_BUCKETS))
    inference_time: Histogram = field(default_factory=lambda: Histogram(_REQUEST_BUCKETS))

    @classmethod
    def up_to(cls, max_model_len: int) -> RequestHistograms:
        """Token-count buckets 1, 2, 5, 10, ... up to ``max_model_len``."""
        bounds = one_two_five_buckets(max_model_len)
        return cls(Histogram(bounds), Histogram(bounds), Histogram(bounds))

    def observe(self, state: _RequestState) -> None:
        params = state.processed.params
        self.prompt_tokens.observe(len(state.processed.prompt_token_ids))
        self.generation_tokens.observe(sum(len(seq.token_ids) for seq in state.sequences.values()))
        self.n_param.observe(params.n)
        if params.max_tokens is not None:  # None: up to the context limit, as vLLM leaves it out
            self.max_tokens_param.observe(params.max_tokens)
        self._observe_times(state)

    def _observe_times(self, state: _RequestState) -> None:
        times = state.metrics
        if times.first_token_time is None or times.first_scheduled_time is None:
            return
        decode_s = times.last_token_time - times.first_token_time
        self.prefill_time.observe(times.first_token_time - times.first_scheduled_time)
        self.decode_time.observe(decode_s)
        self.inference_time.observe(times.last_token_time - times.first_scheduled_time)
        # The pace a client sees: the longest sequence's tokens after its first (n sequences decode side by side).
        longest = max(len(seq.token_ids) for seq in state.sequences.values())
        self.time_per_output_token.observe(decode_s / (longest - 1) if longest > 1 else 0.0)

    def metrics(self) -> list[Metric]:
        return [
            self.prompt_tokens.metric(PREFIX + "request_prompt_tokens"),
            self.generation_tokens.metric(PREFIX + "request_generation_tokens"),
            self.max_tokens_param.metric(PREFIX + "request_params_max_tokens"),
            self.n_param.metric(PREFIX + "request_params_n"),
            self.time_per_output_token.metric(PREFIX + "request_time_per_output_token_seconds"),
            self.prefill_time.metric(PREFIX + "request_prefill_time_seconds"),
            self.decode_time.metric(PREFIX + "request_decode_time_seconds"),
            self.inference_time.metric(PREFIX + "request_inference_time_seconds"),
        ]


@dataclass
class EngineMetrics:
    """Updated by the engine as requests progress, plus the scheduler's latest gauges."""

    max_model_len: int = 8192  # bounds the buckets of per-request token counts
    cache_info: dict[str, str] = field(default_factory=dict)  # the labels of cache_config_info (none: not exported)
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    finished_by_reason: TallyCounter = field(default_factory=TallyCounter)
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(_TTFT_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(_ITL_BUCKETS))
    e2e_request_latency: Histogram = field(default_factory=lambda: Histogram(_REQUEST_BUCKETS))
    request_queue_time: Histogram = field(default_factory=lambda: Histogram(_REQUEST_BUCKETS))
    iteration_tokens: Histogram = field(default_factory=lambda: Histogram(_ITERATION_TOKEN_BUCKETS))
    scheduler: SchedulerStats = field(default_factory=SchedulerStats)
    max_loras: int = 0  # LoRA's adapter slots (0: LoRA off, no lora_requests_info)
    requests: RequestHistograms = field(init=False)

    def __post_init__(self) -> None:
        self.requests = RequestHistograms.up_to(self.max_model_len)

    @classmethod
    def for_engine(cls, config: EngineConfig, startup_report: dict) -> EngineMetrics:
        """The metrics of an engine built from ``config``, whose start-up sized the KV cache as ``startup_report``."""
        return cls(config.scheduler_config.max_model_len, cache_config_info(config, startup_report),
                   max_loras=config.scheduler_config.max_loras)

    @property
    def num_tokens_total(self) -> int:
        """Prompt tokens of requests past their prefill, plus generated tokens."""
        return self.prompt_tokens_total + self.generation_tokens_total

    def record_step(self, stats: SchedulerStats) -> None:
        self.scheduler = stats

    def record_iteration(self, num_tokens_before: int) -> None:
        """One engine step's outputs are processed (``num_tokens_total`` was ``num_tokens_before``): the step's
        tokens, prompts that got their first token plus tokens generated, go to ``iteration_tokens_total``."""
        num_tokens = self.num_tokens_total - num_tokens_before
        if num_tokens:
            self.iteration_tokens.observe(num_tokens)

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
        self.requests.observe(state)

    def record_aborted(self, num_sequences: int) -> None:
        self.finished_by_reason["abort"] += num_sequences

    @staticmethod
    def core_metric_names() -> frozenset[str]:
        """The metrics read from the engine core (its scheduler's stats, its configuration): every front end of one
        core reports the same values, so a view of several front ends takes them once instead of summing them."""
        names = {metric.name for metric in EngineMetrics()._scheduler_metrics()}
        return frozenset({*names, PREFIX + "cache_config_info", PREFIX + "lora_requests_info"})

    def snapshot(self) -> list[Metric]:
        return [*self._scheduler_metrics(), *self._token_counters(), *self._histograms(), *self._info(),
                *self._lora_info()]

    def _scheduler_metrics(self) -> list[Metric]:
        stats = self.scheduler
        return [
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
        ]

    def _token_counters(self) -> list[Metric]:
        metrics = [
            Metric(PREFIX + "prompt_tokens_total", "counter", self.prompt_tokens_total),
            Metric(PREFIX + "generation_tokens_total", "counter", self.generation_tokens_total),
        ]
        for reason in ("stop", "length", "abort"):
            count = self.finished_by_reason[reason]
            metrics.append(Metric(PREFIX + "request_success_total", "counter", count, {"finished_reason": reason}))
        return metrics

    def _histograms(self) -> list[Metric]:
        return [
            self.time_to_first_token.metric(PREFIX + "time_to_first_token_seconds"),
            self.inter_token_latency.metric(PREFIX + "inter_token_latency_seconds"),
            self.e2e_request_latency.metric(PREFIX + "e2e_request_latency_seconds"),
            self.request_queue_time.metric(PREFIX + "request_queue_time_seconds"),
            self.iteration_tokens.metric(PREFIX + "iteration_tokens_total"),
            *self.requests.metrics(),
        ]

    def _lora_info(self) -> list[Metric]:
        """vLLM's ``lora_requests_info``: the running and waiting adapters as labels (comma-separated names), the
        value the time of the reading (so the latest series can be picked)."""
        if not self.max_loras:
            return []
        labels = {"running_lora_adapters": ",".join(self.scheduler.running_lora_adapters),
                  "waiting_lora_adapters": ",".join(self.scheduler.waiting_lora_adapters),
                  "max_lora": str(self.max_loras)}
        return [Metric(PREFIX + "lora_requests_info", "gauge", time.time(), labels)]

    def _info(self) -> list[Metric]:
        return [Metric(PREFIX + "cache_config_info", "gauge", 1.0, dict(self.cache_info))] if self.cache_info else []
