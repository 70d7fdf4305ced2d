"""``GET /metrics``: the engine's metrics in Prometheus text format, read from the engine at scrape time.

A custom collector rather than prometheus_client's own Counter/Histogram objects: the engine already keeps the
values (with fixed buckets), so nothing is double-counted and the HTTP side adds no work per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pagedllm.engine.metrics import Metric as EngineMetric

_DOCS = {
    "pagedllm:num_requests_running": "Number of requests in model execution batches.",
    "pagedllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "pagedllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "pagedllm:num_preemptions_total": "Cumulative number of preemptions from the engine.",
    "pagedllm:kv_cache_shared_blocks": "Number of KV blocks held by more than one request (prefix sharing, forks).",
    "pagedllm:num_swap_preemptions_total": "Cumulative number of preemptions that swapped KV blocks to the CPU.",
    "pagedllm:num_swapped_out_blocks_total": "Cumulative number of KV blocks swapped out to the CPU.",
    "pagedllm:cpu_kv_cache_usage_perc": "CPU swap space usage. 1 means 100 percent usage.",
    "pagedllm:prefix_cache_queries_total": "Prefix cache queries, in number of queried tokens.",
    "pagedllm:prefix_cache_hits_total": "Prefix cache hits, in number of cached tokens.",
    "pagedllm:prompt_tokens_total": "Number of prefill tokens processed.",
    "pagedllm:generation_tokens_total": "Number of generation tokens processed.",
    "pagedllm:request_success_total": "Count of finished requests, by finish reason.",
    "pagedllm:time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "pagedllm:inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "pagedllm:e2e_request_latency_seconds": "Histogram of end to end request latency in seconds.",
    "pagedllm:request_queue_time_seconds": "Histogram of time spent waiting in the queue in seconds.",
    "pagedllm:iteration_tokens_total": "Histogram of the number of tokens per engine step.",
    "pagedllm:request_prompt_tokens": "Number of prefill tokens processed, per finished request.",
    "pagedllm:request_generation_tokens": "Number of generation tokens processed, per finished request.",
    "pagedllm:request_params_max_tokens": "Histogram of the max_tokens request parameter.",
    "pagedllm:request_params_n": "Histogram of the n request parameter.",
    "pagedllm:request_time_per_output_token_seconds": "Histogram of time per output token in seconds, per finished "
                                                      "request.",
    "pagedllm:request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "pagedllm:request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "pagedllm:request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "pagedllm:cache_config_info": "Information of the LLMEngine CacheConfig (the labels; the value is 1).",
}


MetricSources = Callable[[], list[tuple[str, Callable[[], list[EngineMetric]]]]]


class EngineCollector(Collector):
    """Turns engines' ``get_metrics()`` into Prometheus metric families, each sample labelled with its model's served
    name. Several engines (a server of several models) share one family per metric name: the text format allows a
    family only once per exposition."""

    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources  # read at every scrape: models come and go at run time

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for model_name, get_metrics in self._sources():
            for metric in get_metrics():
                labels = {"model_name": model_name, **metric.labels}
                family = families.get(metric.name)
                if family is None:
                    family = families[metric.name] = _new_family(metric, list(labels))
                _add_sample(family, metric, labels)
        yield from families.values()


def _new_family(metric: EngineMetric, label_names: list[str]) -> Metric:
    doc = _DOCS.get(metric.name, metric.name)
    if metric.kind == "counter":
        # prometheus_client appends "_total" itself.
        return CounterMetricFamily(metric.name.removesuffix("_total"), doc, labels=label_names)
    if metric.kind == "histogram":
        return HistogramMetricFamily(metric.name, doc, labels=label_names)
    return GaugeMetricFamily(metric.name, doc, labels=label_names)


def _add_sample(family: Metric, metric: EngineMetric, labels: dict[str, str]) -> None:
    values = list(labels.values())
    if metric.kind == "histogram":
        buckets = [(floatToGoString(bound), count) for bound, count in metric.buckets]
        family.add_metric(values, buckets=buckets, sum_value=metric.value)
    else:
        family.add_metric(values, metric.value)


def build_registry(get_metrics: Callable[[], list[EngineMetric]], model_name: str) -> CollectorRegistry:
    """A registry of its own (not the process-global one), so several apps can live in one process."""
    return build_models_registry(lambda: [(model_name, get_metrics)])


def build_models_registry(sources: MetricSources) -> CollectorRegistry:
    """The registry of a server of several models: ``sources()`` gives (served name, get_metrics) per model."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(sources))
    ProcessCollector(registry=registry)  # process_* metrics: CPU seconds, resident memory, open fds
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of the registry, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
