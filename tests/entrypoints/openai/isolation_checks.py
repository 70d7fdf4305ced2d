"""Checks shared by the issue-13 server tests (isolation, bad-input catalogue, fuzzing): the OpenAI error shape,
the bound on how much input an error message may quote, and a server that is back to idle."""

from __future__ import annotations

import httpx

from tests.entrypoints.openai.conftest import RemoteServer

# An error message quotes at most a bounded prefix of the input (issue 13, finding 8): no message of a 4xx may
# come near the size of the inputs the tests send (100 KB model names, 20,000 token ids).
MAX_ERROR_MESSAGE_CHARS = 2048


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None,
                        check_param: bool = False) -> dict:
    """``response`` has ``status`` and OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` with a
    short, non-empty message; with ``check_param``, ``error.param`` is ``param``. Returns the error object."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:500]}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert len(error["message"]) <= MAX_ERROR_MESSAGE_CHARS, f"message of {len(error['message'])} chars"
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], (str, int)), error
    if check_param:
        assert error["param"] == param, error
    return error


def assert_server_idle(server: RemoteServer, timeout: float = 10.0) -> None:
    """No request running or waiting and no KV block in use, polled for up to ``timeout`` seconds."""
    metrics = server.wait_idle(timeout)
    assert metrics["pagedllm:num_requests_running"] == 0, metrics
    assert metrics["pagedllm:num_requests_waiting"] == 0, metrics
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0, metrics


def assert_serves_a_normal_request(http: httpx.Client, model: str = "tiny") -> None:
    """A plain greedy completion answers 200 with the tokens asked for."""
    response = http.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 4,
                                                  "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["usage"]["completion_tokens"] == 4
