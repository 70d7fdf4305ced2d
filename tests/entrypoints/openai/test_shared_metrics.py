"""``shared_metrics``: the whole server's /metrics from every API server process's snapshot: counters and histograms
summed, the core's metrics taken once."""

from __future__ import annotations

from pagedllm.engine.metrics import EngineMetrics, Histogram, Metric
from pagedllm.entrypoints.openai.shared_metrics import SharedMetrics


def snapshot(requests: int, running: int) -> list[Metric]:
    latency = Histogram((0.1, 1.0))
    for _ in range(requests):
        latency.observe(0.5)
    return [
        Metric("pagedllm:request_success_total", "counter", requests, {"finished_reason": "length"}),
        Metric("pagedllm:request_success_total", "counter", 1, {"finished_reason": "stop"}),
        latency.metric("pagedllm:e2e_request_latency_seconds"),
        Metric("pagedllm:num_requests_running", "gauge", running),  # from the core: alike in every process
        Metric("pagedllm:num_preemptions_total", "counter", 4),  # from the core too
    ]


def test_a_scrape_sums_the_processes_and_takes_the_core_once(tmp_path):
    first = SharedMetrics(str(tmp_path), 0, lambda: snapshot(requests=3, running=5))
    second = SharedMetrics(str(tmp_path), 1, lambda: snapshot(requests=2, running=4))
    second.write()
    merged = {(m.name, tuple(m.labels.items())): m for m in first.collect()}
    assert merged["pagedllm:request_success_total", (("finished_reason", "length"),)].value == 5
    assert merged["pagedllm:request_success_total", (("finished_reason", "stop"),)].value == 2
    latency = merged["pagedllm:e2e_request_latency_seconds", ()]
    assert latency.count == 5 and latency.value == 2.5 and latency.buckets == ((0.1, 0), (1.0, 5), (float("inf"), 5))
    assert merged["pagedllm:num_requests_running", ()].value == 5  # this process's reading, not 9
    assert merged["pagedllm:num_preemptions_total", ()].value == 4


def test_an_unreadable_snapshot_is_skipped(tmp_path):
    (tmp_path / "7.metrics").write_bytes(b"not msgpack")
    own = SharedMetrics(str(tmp_path), 0, lambda: snapshot(requests=1, running=0))
    assert sorted(m.value for m in own.collect()) == sorted(m.value for m in snapshot(requests=1, running=0))


def test_the_core_metrics_are_the_schedulers_and_the_cache_info():
    names = EngineMetrics.core_metric_names()
    assert {"pagedllm:num_requests_running", "pagedllm:kv_cache_usage_perc", "pagedllm:prefix_cache_hits_total",
            "pagedllm:cache_config_info"} <= names
    assert "pagedllm:generation_tokens_total" not in names
