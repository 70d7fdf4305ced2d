"""Many clients at once: 64 concurrent streams give the same greedy text as offline generation, and clients that
go away mid-request (streaming or not) are aborted, their KV blocks freed, while the server keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from tests.entrypoints.openai.conftest import ENGINE_KWARGS, MAX_MODEL_LEN

WORDS = ["fox", "cache", "model", "block", "dog", "time", "text", "users"]


def prompts(num: int) -> list[str]:
    return [f"{i}: the {WORDS[i % 8]} and the {WORDS[(i * 3) % 8]}" + " quick" * (i % 5) for i in range(num)]


async def stream_text(client, prompt: str, max_tokens: int) -> str:
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    return "".join([choice.text async for chunk in stream for choice in chunk.choices])


def test_64_concurrent_streams_equal_offline_generation(server, server_model_dir):
    batch = prompts(64)

    async def run_all() -> list[str]:
        async with server.async_client() as client:
            return await asyncio.gather(*(stream_text(client, p, 16) for p in batch))

    streamed = asyncio.run(run_all())
    llm = LLM(server_model_dir, **ENGINE_KWARGS)
    offline = llm.generate(batch, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert streamed == [output.outputs[0].text for output in offline]
    assert server.wait_idle()["pagedllm:num_requests_running"] == 0


def test_streaming_clients_that_disconnect_are_aborted(server):
    num_clients, max_tokens = 20, 900
    before = server.metrics()["pagedllm:generation_tokens_total"]

    async def open_then_drop(http: httpx.AsyncClient, prompt: str, reading: asyncio.Event, drop: asyncio.Event,
                             counter: list[int]) -> None:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:
                    counter[0] += 1
                    if counter[0] == num_clients:
                        reading.set()
                    await drop.wait()
                    break
        # Leaving the block mid-stream closes the connection.

    async def run() -> float:
        reading, drop, counter = asyncio.Event(), asyncio.Event(), [0]
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=60) as http:
            tasks = [asyncio.create_task(open_then_drop(http, p, reading, drop, counter))
                     for p in prompts(num_clients)]
            await asyncio.wait_for(reading.wait(), 60)
            running = (await asyncio.to_thread(server.metrics))["pagedllm:num_requests_running"]
            drop.set()
            await asyncio.gather(*tasks)
        return running

    running_while_open = asyncio.run(run())
    assert running_while_open > 0  # the requests were in flight when their clients went
    metrics = server.wait_idle(timeout=5)
    assert metrics["pagedllm:num_requests_running"] == 0, metrics
    assert metrics["pagedllm:num_requests_waiting"] == 0, metrics
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0, metrics
    # Aborted early: far fewer tokens than the requests asked for were generated.
    generated = metrics["pagedllm:generation_tokens_total"] - before
    assert generated < num_clients * max_tokens / 2, f"{generated} tokens generated: not aborted early"
    assert_still_serving(server)


def test_non_streaming_client_that_disconnects_is_aborted(server):
    # As long as the context allows, so that no machine is fast enough to finish before the client gives up.
    max_tokens = MAX_MODEL_LEN - 8
    before = server.metrics()["pagedllm:generation_tokens_total"]
    body = {"model": "tiny", "prompt": "hi", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        response = httpx.post(server.url_for("/v1/completions"), json=body, headers=server.headers,
                              timeout=httpx.Timeout(30, read=0.2))
        pytest.fail(f"answered before the client gave up: {response.status_code} {response.text[:300]}")
    metrics = server.wait_idle(timeout=5)
    assert metrics["pagedllm:num_requests_running"] == 0 and metrics["pagedllm:kv_cache_usage_perc"] == 0, metrics
    generated = metrics["pagedllm:generation_tokens_total"] - before
    # With ignore_eos, a request that was not aborted generates exactly max_tokens.
    assert generated < max_tokens, f"{generated} tokens generated: the request was not aborted"
    assert_still_serving(server)


def assert_still_serving(server) -> None:
    completion = server.client().completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0,
                                                    extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 3
