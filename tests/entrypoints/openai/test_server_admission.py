"""Admission control through a real server: a bounded loopback burst at 3x capacity gets 429s with Retry-After,
no request waits past the queue delay for its answer (a refusal, its first token, or its drop), /ready says 503 while the queue is full, a request past its own
timeout is a 408, and afterwards nothing runs, waits or holds KV blocks.

Counts and invariants only: the one time bound (an answer within the delay) is the server's own guarantee plus
generous slack."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.entrypoints.openai.conftest import ENGINE_FLAGS, RemoteServer

pytestmark = pytest.mark.slow  # a server (or several) per module: ~30 s on 2 cores; CI runs it with -m slow

MAX_NUM_SEQS, MAX_NUM_WAITING, DELAY_S = 2, 2, 2.0
CAPACITY = MAX_NUM_SEQS + MAX_NUM_WAITING  # requests the server holds at once
SLACK_S = 5.0  # the engine checks deadlines once per step; a loaded test machine adds scheduling delays


@dataclass
class Outcome:
    status: int
    retry_after: str | None = None
    error_code: str | None = None
    answered_s: float | None = None  # until the first answer: the refusal, the first token or the error event
    completed: bool = False


@pytest.fixture(scope="module")
def admission_server(server_model_dir, tmp_path_factory):
    flags = [*ENGINE_FLAGS, "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-waiting", str(MAX_NUM_WAITING),
             "--max-queue-delay-ms", str(int(DELAY_S * 1000))]
    remote = RemoteServer(server_model_dir, flags, tmp_path_factory.mktemp("admission_logs"))
    yield remote
    remote.terminate()


async def stream_completion(client: httpx.AsyncClient, max_tokens: int) -> Outcome:
    body = {"prompt": "hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread())["error"]
            return Outcome(response.status_code, response.headers.get("retry-after"), error["code"],
                           time.monotonic() - start)
        outcome = Outcome(200)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if outcome.answered_s is None:
                outcome.answered_s = time.monotonic() - start
            if line == "data: [DONE]":
                outcome.completed = outcome.error_code is None
            elif "error" in (chunk := json.loads(line[6:])):
                outcome.error_code = chunk["error"]["code"]
        return outcome


async def burst(base_url: str, num_waves: int, per_wave: int, max_tokens: int) -> list[Outcome]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        outcomes = []
        for _ in range(num_waves):
            outcomes += await asyncio.gather(*(stream_completion(client, max_tokens) for _ in range(per_wave)))
        return outcomes


def rejected(metrics_text: str, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "pagedllm:request_rejected_total" and sample.labels.get("reason") == reason:
                return sample.value
    raise AssertionError(f"no request_rejected_total sample for reason {reason}")


def test_burst_at_three_times_capacity(admission_server):
    outcomes = asyncio.run(burst(admission_server.base_url, num_waves=3, per_wave=3 * CAPACITY, max_tokens=32))
    refused = [o for o in outcomes if o.status == 429]  # refused at once, with a retry hint
    served = [o for o in outcomes if o.completed]
    assert {o.status for o in outcomes} <= {200, 429}, outcomes
    assert refused and served, outcomes
    assert all(o.error_code == "server_overloaded" and o.retry_after.isdigit() and int(o.retry_after) >= 1
               for o in refused), refused
    # Nobody waits past the delay: refused at once, or admitted and served with a first token within it, or dropped
    # at it with a clear error (never both).
    assert all(o.answered_s <= DELAY_S + SLACK_S for o in outcomes), [o.answered_s for o in outcomes]
    assert all(o.completed or o.error_code == "queue_timeout" for o in outcomes if o.status == 200), outcomes
    metrics = admission_server.wait_idle(timeout=30)
    assert metrics["pagedllm:num_requests_running"] == 0 and metrics["pagedllm:num_requests_waiting"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0
    text = httpx.get(admission_server.url_for("/metrics")).text
    assert rejected(text, "max_num_waiting") + rejected(text, "max_queue_delay") == len(refused)


def test_ready_is_503_while_the_queue_is_full(admission_server):
    async def run() -> tuple[int, int, int]:
        async with httpx.AsyncClient(base_url=admission_server.base_url, timeout=60) as client:
            body = {"prompt": "hi", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
            streams = [client.stream("POST", "/v1/completions", json=body) for _ in range(CAPACITY)]
            responses = [await stream.__aenter__() for stream in streams]  # headers: each is admitted
            full = (await client.get("/ready")).status_code
            extra = (await client.post("/v1/completions", json=body)).status_code
            for stream in streams:  # hanging up aborts them
                await stream.__aexit__(None, None, None)
            assert all(response.status_code == 200 for response in responses)
            return full, extra

    full, extra = asyncio.run(run())
    assert (full, extra) == (503, 429)
    admission_server.wait_idle(timeout=30)
    assert httpx.get(admission_server.url_for("/ready")).status_code == 200


def test_request_past_its_timeout_is_a_408(admission_server):
    body = {"prompt": "hi", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "timeout": 0.2}
    response = httpx.post(admission_server.url_for("/v1/completions"), json=body, timeout=60)
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    assert admission_server.wait_idle(timeout=30)["pagedllm:kv_cache_usage_perc"] == 0


def timed_out_count(server: RemoteServer) -> float:
    return rejected(httpx.get(server.url_for("/metrics")).text, "request_timeout")


@pytest.mark.parametrize("stream", [False, True])
def test_responses_request_past_its_timeout_is_aborted(admission_server, stream):
    before = timed_out_count(admission_server)
    body = {"input": "hi", "max_output_tokens": 900, "temperature": 0, "timeout": 0.2, "stream": stream}
    response = httpx.post(admission_server.url_for("/v1/responses"), json=body, timeout=60)
    if stream:  # the 200 went out before the deadline: the stream ends with an error event
        assert response.status_code == 200
        errors = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and '"type":"error"' in line.replace(" ", "")]
        assert errors and errors[-1]["code"] == "request_timeout", response.text[-500:]
    else:
        assert response.status_code == 408, response.text
        assert response.json()["error"]["code"] == "request_timeout"
    assert admission_server.wait_idle(timeout=30)["pagedllm:kv_cache_usage_perc"] == 0
    assert timed_out_count(admission_server) == before + 1


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_beam_search_past_its_timeout_is_a_408_counted_once(admission_server, route):
    before = timed_out_count(admission_server)
    body = {"max_tokens": 900, "n": 2, "use_beam_search": True, "ignore_eos": True, "timeout": 0.3}
    body |= {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    start = time.monotonic()
    response = httpx.post(admission_server.url_for(route), json=body, timeout=60)
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - start < 0.3 + SLACK_S
    metrics = admission_server.wait_idle(timeout=30)
    assert metrics["pagedllm:num_requests_running"] == 0 and metrics["pagedllm:kv_cache_usage_perc"] == 0
    assert timed_out_count(admission_server) == before + 1  # one request, however many engine requests it ran


def test_beam_search_within_its_timeout_answers(admission_server):
    body = {"prompt": "hi", "max_tokens": 4, "n": 2, "use_beam_search": True, "timeout": 60}
    response = httpx.post(admission_server.url_for("/v1/completions"), json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2
