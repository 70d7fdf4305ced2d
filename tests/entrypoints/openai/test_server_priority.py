"""The ``priority`` request field: accepted on both endpoints, and with ``--scheduling-policy priority`` a
high-priority request overtakes a queued low-priority one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from pagedllm.entrypoints.cli import make_parser
from pagedllm.entrypoints.engine_args import engine_kwargs_from_cli
from tests.entrypoints.openai.conftest import ENGINE_FLAGS, RemoteServer


def test_priority_is_accepted_on_both_endpoints(client):
    completion = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0,
                                           extra_body={"ignore_eos": True, "priority": -2})
    assert completion.usage.completion_tokens == 3
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, extra_body={"ignore_eos": True, "priority": 7})
    assert chat.usage.completion_tokens == 3


def test_scheduling_policy_flag_reaches_the_engine_args():
    args = make_parser().parse_args(["serve", "--scheduling-policy", "priority"])
    assert engine_kwargs_from_cli(args)["scheduling_policy"] == "priority"
    assert "scheduling_policy" not in engine_kwargs_from_cli(make_parser().parse_args(["serve"]))


@pytest.fixture(scope="module")
def priority_server(server_model_dir, tmp_path_factory) -> Iterator[RemoteServer]:
    remote = RemoteServer(server_model_dir, [*ENGINE_FLAGS, "--scheduling-policy", "priority", "--max-num-seqs", "1"],
                          tmp_path_factory.mktemp("priority_server_logs"))
    yield remote
    remote.terminate()


def test_high_priority_request_overtakes_a_waiting_low_one(priority_server):
    server = priority_server
    finished: list[str] = []

    def body(max_tokens: int, priority: int, stream: bool = False) -> dict:
        return {"prompt": "the quick brown fox", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "priority": priority, "stream": stream}

    async def complete(http: httpx.AsyncClient, name: str, max_tokens: int, priority: int) -> None:
        response = await http.post("/v1/completions", json=body(max_tokens, priority))
        assert response.status_code == 200, response.text
        finished.append(name)

    async def wait_for(predicate, timeout: float = 30) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            metrics = await asyncio.to_thread(server.metrics)
            if predicate(metrics):
                return metrics
            await asyncio.sleep(0.02)
        pytest.fail(f"the server never reached the expected state: {metrics}")

    async def run() -> dict[str, float]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            async with http.stream("POST", "/v1/completions", json=body(900, 10, stream=True)) as long_low:
                lines = long_low.aiter_lines()
                assert (await anext(lines)).startswith("data: ")  # the long low-priority request is running
                waiting_low = asyncio.create_task(complete(http, "waiting low", 30, 10))
                seen = await wait_for(lambda m: m["pagedllm:num_requests_waiting"] == 1)
                high = asyncio.create_task(complete(http, "high", 30, 0))
                async for _ in lines:
                    pass
                finished.append("long low")
            await asyncio.gather(waiting_low, high)
        return seen

    seen = asyncio.run(run())
    assert seen["pagedllm:num_requests_running"] == 1  # the long one ran and the low one waited as high arrived
    assert finished.index("high") < finished.index("waiting low"), finished
    assert finished[-1] == "waiting low", finished  # under priority, FCFS holds within a priority
