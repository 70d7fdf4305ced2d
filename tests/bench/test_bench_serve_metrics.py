"""Serving metrics follow vLLM's definitions."""

from __future__ import annotations

import pytest

from pagedllm.bench.serve_metrics import RequestResult, compute_metrics, parse_goodput


def _results() -> list[RequestResult]:
    return [
        RequestResult(True, 10, 5, ttft_s=0.1, latency_s=0.5, itl_s=[0.1] * 4),
        RequestResult(True, 20, 1, ttft_s=0.3, latency_s=0.3, itl_s=[]),
        RequestResult(True, 30, 3, ttft_s=0.2, latency_s=1.2, itl_s=[0.2, 0.8]),
        RequestResult(False, 40, 0, error="HTTP 500"),
    ]


def test_metrics_follow_vllm_definitions():
    metrics = compute_metrics(_results(), duration_s=2.0, slos_ms={})
    assert (metrics["completed"], metrics["failed"]) == (3, 1)
    assert metrics["total_input_tokens"] == 60 and metrics["total_output_tokens"] == 9
    assert metrics["request_throughput"] == pytest.approx(1.5)
    assert metrics["output_throughput"] == pytest.approx(4.5)
    assert metrics["total_token_throughput"] == pytest.approx(34.5)
    assert metrics["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert metrics["ttft_ms"]["median"] == pytest.approx(200.0)
    # TPOT per request of >1 output token: (0.5 - 0.1) / 4 = 0.1 and (1.2 - 0.2) / 2 = 0.5
    assert metrics["tpot_ms"]["mean"] == pytest.approx(300.0)
    # ITL pooled over all gaps: 4 x 0.1, 0.2, 0.8
    assert metrics["itl_ms"]["mean"] == pytest.approx(1000 * 1.4 / 6)
    assert metrics["itl_ms"]["p99"] == pytest.approx(200 + 0.95 * 600)  # numpy's linear interpolation
    assert metrics["e2el_ms"]["mean"] == pytest.approx(1000 * 2.0 / 3)
    assert "request_goodput" not in metrics


def test_goodput_counts_requests_meeting_every_slo():
    metrics = compute_metrics(_results(), duration_s=2.0, slos_ms=parse_goodput(["ttft:300", "tpot:200"]))
    assert metrics["good_requests"] == 2  # the third has TTFT 200 ms but TPOT 500 ms
    assert metrics["request_goodput"] == pytest.approx(1.0)
    assert compute_metrics(_results(), 2.0, {"e2el": 400.0})["good_requests"] == 1


@pytest.mark.parametrize("items", [["ttft"], ["speed:10"], ["ttft:fast"], ["tpot:0"]])
def test_bad_goodput_is_rejected(items):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput(items)
