"""Bad input: each case is a 4xx in OpenAI's error shape naming the parameter, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

LONG_PROMPT = "the quick brown fox " * 400  # far more than 1024 tokens
USER = [{"role": "user", "content": "hi"}]

# (id, path, raw body or JSON, expected status, expected param)
CASES = [
    ("malformed-json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("not-json", "/v1/chat/completions", b"hello there", 400, None),
    ("json-array", "/v1/completions", [1, 2, 3], 400, None),
    ("missing-prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("prompt-wrong-type", "/v1/completions", {"prompt": 123}, 400, "prompt"),
    ("max-tokens-string", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature-string", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("stream-string", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("messages-string", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("temperature-negative", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("chat-temperature-negative", "/v1/chat/completions", {"messages": USER, "temperature": -1}, 400, "temperature"),
    ("top-p-zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", "/v1/chat/completions", {"messages": USER, "top_p": 1.5}, 400, "top_p"),
    ("n-zero", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("max-tokens-negative", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("max-tokens-beyond-context", "/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
    ("chat-max-tokens-beyond-context", "/v1/chat/completions", {"messages": USER, "max_completion_tokens": 2000},
     400, "max_completion_tokens"),
    ("prompt-beyond-context", "/v1/completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("chat-prompt-beyond-context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ("unknown-model", "/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("chat-unknown-model", "/v1/chat/completions", {"model": "gpt-17", "messages": USER}, 404, "model"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("unknown-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("image-content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
    ("token-id-out-of-vocab", "/v1/completions", {"prompt": [5, 6, 100000]}, 400, "prompt"),
    ("negative-token-id", "/v1/completions", {"prompt": [[5, -1]]}, 400, "prompt"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty-prompt-list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("logprobs-above-max-logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("top-logprobs-above-20", "/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("suffix", "/v1/completions", {"prompt": "hi", "suffix": "bye"}, 400, "suffix"),
    ("presence-penalty", "/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("stop-token-out-of-vocab", "/v1/completions", {"prompt": "hi", "stop_token_ids": [10**6]}, 400,
     "stop_token_ids"),
    ("logit-bias-key", "/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("min-tokens-above-max", "/v1/completions", {"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, 400,
     "min_tokens"),
    ("stream-options-without-stream", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("tools", "/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("tokenize-missing-prompt", "/tokenize", {"text": "hi"}, 400, "prompt"),
    ("unknown-route", "/v1/audio/transcriptions", {"input": "hi"}, 404, None),
    ("priority-string", "/v1/completions", {"prompt": "hi", "priority": "high"}, 400, "priority"),
    ("priority-float", "/v1/completions", {"prompt": "hi", "priority": 1.5}, 400, "priority"),
    ("chat-priority-bool", "/v1/chat/completions", {"messages": USER, "priority": True}, 400, "priority"),
    ("use-beam-search-string", "/v1/completions", {"prompt": "hi", "use_beam_search": "yes"}, 400,
     "use_beam_search"),
    ("length-penalty-string", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "length_penalty": "x"},
     400, "length_penalty"),
    ("beam-search-stream", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "n": 2, "stream": True},
     400, "stream"),
    ("chat-beam-search-stream", "/v1/chat/completions",
     {"messages": USER, "use_beam_search": True, "n": 2, "stream": True}, 400, "stream"),
    ("beam-search-logprobs", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "logprobs": 1}, 400,
     "logprobs"),
    ("chat-beam-search-logprobs", "/v1/chat/completions", {"messages": USER, "use_beam_search": True,
                                                           "logprobs": True}, 400, "logprobs"),
    ("beam-search-stop", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "stop": ["x"]}, 400, "stop"),
    ("beam-search-n-zero", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "n": 0}, 400, "n"),
    ("beam-search-max-tokens-zero", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "max_tokens": 0},
     400, "max_tokens"),
    ("beam-search-max-tokens-beyond-context", "/v1/chat/completions",
     {"messages": USER, "use_beam_search": True, "max_tokens": 5000}, 400, "max_tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_in_openai_shape(http, path, body, status, param):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_wrong_method_and_text_body_without_json_content_type(http):
    response = http.get("/v1/completions")
    assert response.status_code == 405 and "error" in response.json()
    response = http.post("/v1/completions", content=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_server_still_serves_after_bad_input(server, client):
    assert httpx.get(server.url_for("/health")).status_code == 200
    completion = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 2
    assert server.wait_idle()["pagedllm:num_requests_running"] == 0
