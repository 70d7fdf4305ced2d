"""Bounded compile time on the server, in process: a spec whose grammar compiles for longer than the timeout is a
400 for that request only; requests sent while that compile runs are served; no KV block is left in use. The
slow compile is real (``slow_grammars``), in a worker process killed at the deadline."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.entrypoints.openai.server import build_app
from tests.entrypoints.openai.conftest import serve_args
from tests.structured_output.slow_grammars import slow_json_schema
from tests.structured_output.test_compile_timeout import TIMEOUT_S, short_compile_timeout

USER = [{"role": "user", "content": "Answer."}]


def _wait_until_idle(engine: AsyncEngine, timeout: float = 10.0) -> bool:
    core = engine.engine.engine_core
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not core.has_unfinished_requests() and core.scheduler.kv_cache_manager.num_free_blocks == core.num_blocks:
            return True
        time.sleep(0.05)
    return False


def test_compile_timeout_is_a_400_for_that_request_only(engine, monkeypatch):
    short_compile_timeout(engine.structured_output_manager, monkeypatch)
    client = TestClient(build_app(engine, serve_args()))
    slow_body = {"messages": USER, "max_tokens": 8, "structured_outputs": {"json": slow_json_schema("server")}}
    slow_response = []
    slow = threading.Thread(target=lambda: slow_response.append(client.post("/v1/chat/completions", json=slow_body)))
    slow.start()
    # Served while the slow grammar compiles: a grammar of its own and a plain request.
    constrained = client.post("/v1/chat/completions", json={
        "messages": USER, "max_tokens": 40, "structured_outputs": {"choice": ["yes", "no"]}})
    plain = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5, "temperature": 0})
    assert slow.is_alive()  # the slow compile was still running all along
    slow.join(timeout=30)
    assert constrained.status_code == 200 and constrained.json()["choices"][0]["message"]["content"] in ("yes", "no")
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 5
    (response,) = slow_response
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "structured_outputs"
    assert f"longer than {TIMEOUT_S:g} s to compile" in error["message"]
    assert _wait_until_idle(engine)


def test_compile_timeout_in_a_stream_is_a_400_before_streaming(engine, monkeypatch):
    short_compile_timeout(engine.structured_output_manager, monkeypatch)
    client = TestClient(build_app(engine, serve_args()))
    response = client.post("/v1/chat/completions", json={
        "messages": USER, "max_tokens": 8, "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": slow_json_schema("sse")}}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    assert _wait_until_idle(engine)
