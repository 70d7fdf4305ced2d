"""The server's work limits (``--max-n``, ``--max-prompts-per-request``, ``--max-logprobs``, ...): a request over
one is a 400 naming the field, the limit and its flag, before any work; a request at the limit succeeds.

A server of its own runs with small limits, so that requests at each limit stay cheap."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.entrypoints.openai.conftest import ENGINE_FLAGS, RemoteServer

LIMIT_FLAGS = {
    "--max-n": 4,
    "--max-prompts-per-request": 3,
    "--max-logprobs": 5,
    "--max-stop-sequences": 2,
    "--max-stop-sequence-chars": 8,
    "--max-stop-token-ids": 3,
    "--max-logit-bias-entries": 4,
    "--max-tools": 2,
    "--max-sequences-per-request": 6,
}
USER = [{"role": "user", "content": "hi"}]
CHEAP = {"max_tokens": 1, "temperature": 1.0}


def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def limited(server_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    flags = [str(part) for flag, value in LIMIT_FLAGS.items() for part in (flag, value)]
    remote = RemoteServer(server_model_dir, [*ENGINE_FLAGS, "--served-model-name", "tiny", *flags],
                          tmp_path_factory.mktemp("limits_server"))
    with httpx.Client(base_url=remote.base_url, timeout=60) as session:
        yield session
    remote.terminate()


# (id, path, body over the limit, param, flag, the same request at the limit)
CASES = [
    ("n", "/v1/completions", {"prompt": "hi", "n": 5}, "n", "--max-n", {"prompt": "hi", "n": 4}),
    ("chat-n", "/v1/chat/completions", {"messages": USER, "n": 5}, "n", "--max-n", {"messages": USER, "n": 4}),
    ("best-of", "/v1/completions", {"prompt": "hi", "best_of": 5}, "best_of", "--max-n",
     {"prompt": "hi", "n": 4, "best_of": 4}),
    ("beam-width", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "n": 5}, "n", "--max-n",
     {"prompt": "hi", "use_beam_search": True, "n": 4}),
    ("chat-beam-width", "/v1/chat/completions", {"messages": USER, "use_beam_search": True, "n": 5}, "n", "--max-n",
     {"messages": USER, "use_beam_search": True, "n": 4}),
    ("prompts", "/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt", "--max-prompts-per-request",
     {"prompt": ["a", "b", "c"]}),
    ("token-id-prompts", "/v1/completions", {"prompt": [[5], [6], [7], [8]]}, "prompt", "--max-prompts-per-request",
     {"prompt": [[5], [6], [7]]}),
    ("sequences", "/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, "n", "--max-sequences-per-request",
     {"prompt": ["a", "b", "c"], "n": 2}),
    ("logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs", "--max-logprobs",
     {"prompt": "hi", "logprobs": 5}),
    ("top-logprobs", "/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 6},
     "top_logprobs", "--max-logprobs", {"messages": USER, "logprobs": True, "top_logprobs": 5}),
    ("prompt-logprobs", "/v1/completions", {"prompt": "hi", "prompt_logprobs": 6}, "prompt_logprobs",
     "--max-logprobs", {"prompt": "hi", "prompt_logprobs": 5}),
    ("chat-prompt-logprobs", "/v1/chat/completions", {"messages": USER, "prompt_logprobs": 6}, "prompt_logprobs",
     "--max-logprobs", {"messages": USER, "prompt_logprobs": 5}),
    ("echo-logprobs", "/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 6}, "logprobs", "--max-logprobs",
     {"prompt": "hi", "echo": True, "logprobs": 5}),
    ("stop-count", "/v1/completions", {"prompt": "hi", "stop": ["x", "y", "z"]}, "stop", "--max-stop-sequences",
     {"prompt": "hi", "stop": ["x", "y"]}),
    ("stop-length", "/v1/chat/completions", {"messages": USER, "stop": "123456789"}, "stop",
     "--max-stop-sequence-chars", {"messages": USER, "stop": "12345678"}),
    ("stop-token-ids", "/v1/completions", {"prompt": "hi", "stop_token_ids": [5, 6, 7, 8]}, "stop_token_ids",
     "--max-stop-token-ids", {"prompt": "hi", "stop_token_ids": [5, 6, 7]}),
    ("logit-bias", "/v1/completions", {"prompt": "hi", "logit_bias": {str(t): 1 for t in range(5)}}, "logit_bias",
     "--max-logit-bias-entries", {"prompt": "hi", "logit_bias": {str(t): 1 for t in range(4)}}),
    ("tools", "/v1/chat/completions", {"messages": USER, "tools": [_tool("a"), _tool("b"), _tool("c")]}, "tools",
     "--max-tools", {"messages": USER, "tools": [_tool("a"), _tool("b")], "tool_choice": "none"}),
]


@pytest.mark.parametrize(("path", "over", "param", "flag", "at_limit"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_over_a_limit_is_a_400_naming_the_field_and_the_flag(limited, path, over, param, flag, at_limit):
    response = limited.post(path, json={**CHEAP, **over})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert f"at most {LIMIT_FLAGS[flag]} ({flag})" in error["message"], error["message"]
    response = limited.post(path, json={**CHEAP, **at_limit})
    assert response.status_code == 200, response.text


def test_a_stream_over_a_limit_is_a_400_before_it_starts(limited):
    response = limited.post("/v1/chat/completions", json={**CHEAP, "messages": USER, "n": 5, "stream": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_limits_are_checked_before_tokenizing(limited):
    """4 prompts of 900,000 characters each (seconds of tokenizing): refused for their number at once."""
    response = limited.post("/v1/completions", json={"prompt": ["word " * 180_000] * 4, **CHEAP})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert response.elapsed.total_seconds() < 1.5


def test_default_max_n_is_16(http):
    """The shared server runs with the default limits."""
    response = http.post("/v1/completions", json={"prompt": "hi", "n": 17, **CHEAP})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "n must be at most 16 (--max-n), got 17"
    response = http.post("/v1/completions", json={"prompt": "hi", "n": 16384, "use_beam_search": True, **CHEAP})
    assert response.status_code == 400 and "(--max-n)" in response.json()["error"]["message"]
