"""``use_beam_search`` over HTTP: the same hypotheses, best first, as ``LLM.beam_search`` on the same model; usage
counts the prompt once and every returned token; a client that goes away aborts the search."""

from __future__ import annotations

import time

import httpx
import pytest

from pagedllm import LLM, BeamSearchParams
from tests.entrypoints.openai.conftest import ENGINE_KWARGS

PROMPTS = ["Once upon a time there was", "The quick brown fox"]
MESSAGES = [{"role": "user", "content": "Tell me about the little model"}]


@pytest.fixture(scope="module")
def offline(server_model_dir) -> LLM:
    return LLM(server_model_dir, **ENGINE_KWARGS)


def test_completion_beam_search_equals_offline(http, offline):
    body = {"model": "tiny", "prompt": PROMPTS, "n": 3, "max_tokens": 8, "use_beam_search": True,
            "length_penalty": 0.5}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    expected = offline.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.5))
    assert [choice["index"] for choice in completion["choices"]] == list(range(6))
    for prompt_index, output in enumerate(expected):
        choices = completion["choices"][prompt_index * 3:(prompt_index + 1) * 3]
        assert [c["text"] for c in choices] == [s.text for s in output.sequences]  # best first
        assert [c["finish_reason"] for c in choices] == [s.finish_reason for s in output.sequences]
    assert completion["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in expected)
    assert completion["usage"]["completion_tokens"] == sum(len(s.token_ids) for o in expected for s in o.sequences)


def test_chat_beam_search_equals_offline(http, offline):
    body = {"model": "tiny", "messages": MESSAGES, "n": 2, "max_completion_tokens": 6, "use_beam_search": True,
            "ignore_eos": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    chat = response.json()
    prompt_ids = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    (expected,) = offline.beam_search({"prompt_token_ids": prompt_ids},
                                      BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True))
    assert [c["message"]["content"] for c in chat["choices"]] == [s.text for s in expected.sequences]
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in chat["choices"])
    assert chat["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 12,
                             "total_tokens": len(prompt_ids) + 12}


def test_beam_search_with_echo_and_priority(http, offline):
    body = {"prompt": PROMPTS[0], "n": 2, "max_tokens": 4, "use_beam_search": True, "echo": True, "priority": 3}
    completion = http.post("/v1/completions", json=body).json()
    (expected,) = offline.beam_search(PROMPTS[0], BeamSearchParams(beam_width=2, max_tokens=4))
    assert [c["text"] for c in completion["choices"]] == [PROMPTS[0] + s.text for s in expected.sequences]


def test_beam_search_client_that_disconnects_is_aborted(server):
    width, max_tokens = 4, 1000
    before = server.metrics()["pagedllm:generation_tokens_total"]
    body = {"prompt": "hi", "n": width, "max_tokens": max_tokens, "use_beam_search": True, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        response = httpx.post(server.url_for("/v1/completions"), json=body, headers=server.headers,
                              timeout=httpx.Timeout(30, read=0.5))
        pytest.fail(f"answered before the client gave up: {response.status_code} {response.text[:300]}")
    # Between two steps of a live search the engine is idle for a moment: wait until the count stops moving.
    deadline, last = time.monotonic() + 10, None
    while True:
        metrics = server.wait_idle(timeout=5)
        generated = metrics["pagedllm:generation_tokens_total"]
        if generated == last or time.monotonic() > deadline:
            break
        last = generated
        time.sleep(0.3)
    assert metrics["pagedllm:num_requests_running"] == 0 and metrics["pagedllm:kv_cache_usage_perc"] == 0, metrics
    assert generated - before < width * max_tokens / 2, f"{generated - before} tokens: the search was not aborted"
