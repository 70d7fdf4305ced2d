"""vLLM's per-request histograms and ``cache_config_info`` on ``/metrics`` of a real server, and HELP text for every
metric. Counts and sums of tokens are checked exactly (as differences around requests of known size), timings
only for their counts: the shared server may have served other tests before."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedllm.engine.metrics import EngineMetrics, one_two_five_buckets
from pagedllm.entrypoints.openai.metrics import _DOCS
from tests.entrypoints.openai.conftest import MAX_MODEL_LEN

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]  # token ids: prompt sizes are exact
MAX_TOKENS = [4, 6, 3]
N = [1, 2, 1]
PER_REQUEST = ["request_prompt_tokens", "request_generation_tokens", "request_params_n", "request_params_max_tokens",
               "request_time_per_output_token_seconds", "request_prefill_time_seconds",
               "request_decode_time_seconds", "request_inference_time_seconds"]


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels without model_name): value}."""
    text = httpx.get(server.url_for("/metrics"), timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[("pagedllm:" + name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def before_and_after(server):
    """Metrics before and after three completions of known prompt and output sizes (one with n=2)."""
    server.wait_idle()
    before = scrape(server)
    for prompt, max_tokens, n in zip(PROMPTS, MAX_TOKENS, N):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "n": n, "ignore_eos": True,
                "temperature": 1.0, "seed": 0}
        response = httpx.post(server.url_for("/v1/completions"), json=body, headers=server.headers, timeout=60)
        assert response.status_code == 200, response.text
    server.wait_idle()
    return before, scrape(server)


def delta(before_and_after, name: str, **labels: str) -> float:
    before, after = before_and_after
    return value(after, name, **labels) - value(before, name, **labels)


def test_each_request_is_counted_once_in_every_per_request_histogram(before_and_after):
    for name in PER_REQUEST:
        assert delta(before_and_after, name + "_count") == len(PROMPTS), name


def test_token_histograms_sum_the_requests_tokens(before_and_after):
    assert delta(before_and_after, "request_prompt_tokens_sum") == sum(map(len, PROMPTS))
    generated = sum(max_tokens * n for max_tokens, n in zip(MAX_TOKENS, N))
    assert delta(before_and_after, "request_generation_tokens_sum") == generated
    assert delta(before_and_after, "request_params_n_sum") == sum(N)
    assert delta(before_and_after, "request_params_max_tokens_sum") == sum(MAX_TOKENS)


def test_token_histograms_use_one_two_five_buckets_up_to_max_model_len(before_and_after):
    _, after = before_and_after
    bounds = {float(dict(labels)["le"]) for (name, labels) in after if name == "pagedllm:request_prompt_tokens_bucket"}
    assert bounds == {*map(float, one_two_five_buckets(MAX_MODEL_LEN)), float("inf")}
    # A 3-token and a 2-token prompt fall in the bucket "le=5", not in "le=2" together.
    assert delta(before_and_after, "request_prompt_tokens_bucket", le="2.0") == 1
    assert delta(before_and_after, "request_prompt_tokens_bucket", le="5.0") == 3


def test_iteration_tokens_add_up_to_the_prompt_and_generation_counters(before_and_after):
    tokens = delta(before_and_after, "prompt_tokens_total") + delta(before_and_after, "generation_tokens_total")
    assert delta(before_and_after, "iteration_tokens_total_sum") == tokens
    assert delta(before_and_after, "iteration_tokens_total_count") >= max(MAX_TOKENS)  # one per step at least


def test_cache_config_info_labels_the_kv_cache(before_and_after):
    _, after = before_and_after
    [(labels, gauge)] = [(dict(labels), v) for (name, labels), v in after.items()
                         if name == "pagedllm:cache_config_info"]
    assert gauge == 1
    assert labels["block_size"] == "16" and labels["num_gpu_blocks"] == "2048" and labels["num_cpu_blocks"] == "0"
    assert labels["enable_prefix_caching"] == "True" and labels["cache_dtype"] == "auto"
    assert {"gpu_memory_utilization", "swap_space_bytes", "preemption_mode"} <= set(labels)


def test_every_metric_has_help_text(server):
    text = httpx.get(server.url_for("/metrics"), timeout=10).text
    families = [family for family in text_string_to_metric_families(text) if family.name.startswith("pagedllm:")]
    undocumented = [family.name for family in families if family.documentation in ("", family.name)]
    assert families and undocumented == []


def test_every_engine_metric_is_documented():
    names = {metric.name for metric in EngineMetrics(cache_info={"block_size": "16"}).snapshot()}
    assert names - set(_DOCS) == set()
