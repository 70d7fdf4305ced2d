"""Several API server processes in front of one engine core (``serve --api-server-count 2``): a concurrent burst
gets the greedy outputs one API server gives, and both processes take requests; /metrics of either counts every
request; the core's death fails the streams and the server exits 1; SIGTERM drains and reaps every child; a flag
the layout cannot support is refused at start-up."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.engine.test_core_process import _child_pids, _is_engine_core, _state
from tests.entrypoints.openai.conftest import ENGINE_FLAGS, REPO_ROOT, RemoteServer

FLAGS = [*ENGINE_FLAGS, "--served-model-name", "tiny", "--api-server-count", "2", "--cpu-threads", "1"]
PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground", "It was the best of times",
           "Call me Ishmael", "All happy families", "It is a truth", "Far out in the uncharted"]
API_SERVER_HEADER = "x-pagedllm-api-server"


@pytest.fixture(scope="module")
def two_servers(server_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    remote = RemoteServer(server_model_dir, FLAGS, tmp_path_factory.mktemp("api_servers_logs"))
    yield remote
    remote.terminate()


def _requests(model: str) -> list[tuple[str, dict]]:
    """Completions and chat, streaming and not, over every prompt: (path, body)."""
    requests = []
    for index, prompt in enumerate(PROMPTS):
        stream = index % 2 == 1
        common = {"model": model, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": stream}
        requests.append(("/v1/completions", {**common, "prompt": prompt}))
        requests.append(("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}))
    return requests


def _text(path: str, response: httpx.Response, stream: bool) -> str:
    """The generated text of a completions or chat answer, streamed (SSE) or whole."""
    field = (lambda choice: choice["text"]) if path == "/v1/completions" else None
    if not stream:
        choice = response.json()["choices"][0]
        return field(choice) if field else choice["message"]["content"]
    text = ""
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text += field(choice) if field else (choice["delta"].get("content") or "")
    return text


async def _burst(remote: RemoteServer, model: str) -> list[tuple[str, str | None]]:
    """Every request at once, each on its own connection: (text, answering API server) per request."""
    async def one(path: str, body: dict) -> tuple[str, str | None]:
        async with httpx.AsyncClient(base_url=remote.base_url, headers=remote.headers, timeout=120) as client:
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
            return _text(path, response, body["stream"]), response.headers.get(API_SERVER_HEADER)

    return list(await asyncio.gather(*(one(path, body) for path, body in _requests(model))))


def _finished_total(remote: RemoteServer) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(remote.url_for("/metrics"), timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "pagedllm:request_success_total")


@pytest.mark.slow
def test_a_burst_gets_the_outputs_of_one_api_server_from_both_processes(two_servers, server):
    served = asyncio.run(_burst(two_servers, "tiny"))
    alone = asyncio.run(_burst(server, "tiny"))
    assert [text for text, _ in served] == [text for text, _ in alone]
    assert {answered_by for _, answered_by in served} == {"0", "1"}
    assert all(answered_by is None for _, answered_by in alone)  # one API server: no header


@pytest.mark.slow
def test_metrics_of_either_process_count_every_request(two_servers):
    before = _finished_total(two_servers)
    body = {"model": "tiny", "prompt": "Count me", "max_tokens": 3, "temperature": 0, "ignore_eos": True}

    async def burst() -> set[str]:  # at once, a connection each: both processes take some
        async def one() -> str:
            async with httpx.AsyncClient(timeout=60) as client:
                response = await client.post(two_servers.url_for("/v1/completions"), json=body)
                return response.headers[API_SERVER_HEADER]
        return set(await asyncio.gather(*(one() for _ in range(16))))

    assert asyncio.run(burst()) == {"0", "1"}
    deadline = time.monotonic() + 10  # the other process's share is written every 0.5 s
    totals = []
    while time.monotonic() < deadline:
        totals = [_finished_total(two_servers) - before for _ in range(4)]  # scrapes reach either process
        if totals == [16] * 4:
            return
        time.sleep(0.2)
    pytest.fail(f"/metrics counted {totals} of 16 requests")


@pytest.mark.slow
def test_killing_the_core_fails_the_streams_and_the_server_exits_1(server_model_dir, tmp_path):
    remote = RemoteServer(server_model_dir, FLAGS, tmp_path)
    try:
        core_pid = int(re.search(r"Engine core process (\d+) serves", remote.log()).group(1))
        children = _spawned_children(remote.proc.pid)
        results = _stream_in_threads(remote, 4, lambda: os.kill(core_pid, signal.SIGKILL))
        assert len(results) == 4 and all("died unexpectedly" in text for text in results), results
        health = remote.health_until_exit()
        assert remote.proc.wait(timeout=30) == 1, remote.log()
        assert health in (None, 503)
        assert all(_state(pid) == "gone" for pid in children)
    finally:
        remote.terminate()


@pytest.mark.slow
def test_sigterm_drains_every_api_server_and_reaps_all_children(server_model_dir, tmp_path):
    remote = RemoteServer(server_model_dir, [*FLAGS, "--graceful-shutdown-timeout", "1"], tmp_path)
    try:
        children = _spawned_children(remote.proc.pid)
        assert len(children) == 3  # the core and two API servers
        results = _stream_in_threads(remote, 4, lambda: remote.proc.send_signal(signal.SIGTERM), max_tokens=1000)
        assert remote.proc.wait(timeout=40) == 0, remote.log()
        assert all(_state(pid) == "gone" for pid in children)  # reaped: neither running nor a zombie
        # Every stream was ended by its server, not cut: its last line is [DONE].
        assert len(results) == 4 and all(text.rstrip().endswith("data: [DONE]") for text in results), results
        assert "Traceback" not in remote.log()
    finally:
        remote.terminate()


@pytest.mark.slow  # a whole serve process start (~10 s on 2 cores)
def test_a_flag_the_layout_cannot_support_is_refused_at_start_up(server_model_dir):
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", server_model_dir, "--device", "cpu",
               "--api-server-count", "2", "--max-num-waiting", "8"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False)
    assert result.returncode == 2
    assert "--api-server-count 2 does not work with --max-num-waiting" in result.stderr


def _spawned_children(pid: int) -> list[int]:
    """The server's core and API server processes (not multiprocessing's resource tracker, which exits by itself
    once the server is gone)."""
    return [child for child in _child_pids(pid) if _is_engine_core(child)]


def _stream_in_threads(remote: RemoteServer, count: int, once_streaming, max_tokens: int = 400) -> list[str]:
    """``count`` streams, each on its own connection; ``once_streaming()`` runs when every one has chunks. Each
    stream's whole body (or the error that cut it)."""
    streaming = threading.Barrier(count + 1)
    results: list[str] = []

    def stream(index: int) -> None:
        body = {"model": "tiny", "prompt": PROMPTS[index], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", remote.url_for("/v1/completions"), json=body, timeout=60) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) == 3:
                        streaming.wait(timeout=60)
        except httpx.HTTPError as exc:
            lines.append(f"cut: {exc!r}")
        results.append("\n".join(lines))

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    streaming.wait(timeout=60)
    once_streaming()
    for thread in threads:
        thread.join(60)
    return results


