"""The OpenAI API of a real server process, through the official ``openai`` client and raw HTTP: completions, chat,
streaming, n > 1, logprobs, stop, usage, echo, models, health, metrics, tokenize, detokenize, version, auth."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import pagedllm

PROMPT = "Once upon a time there was a little model"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox"}]


def test_models_lists_every_served_name(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-alias"]
    assert models.data[0].max_model_len == 1024


def test_health_version_and_unauthenticated_public_routes(server):
    assert httpx.get(server.url_for("/health")).status_code == 200
    assert httpx.get(server.url_for("/version")).json() == {"version": pagedllm.__version__}


def test_completion_greedy_with_usage(client, http):
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.object == "text_completion" and completion.model == "tiny"
    assert completion.id.startswith("cmpl-")
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.text
    num_prompt = http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert completion.usage.prompt_tokens == num_prompt
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == num_prompt + 12
    # An alias answers too, and greedy is deterministic.
    again = client.completions.create(model="tiny-alias", prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == choice.text


def test_completion_default_max_tokens_is_16(client):
    completion = client.completions.create(model="tiny", prompt=PROMPT, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16


def test_completion_stream_reassembles_to_the_full_text(client):
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len(text_chunks) > 1
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 20 and usage.prompt_tokens > 0


def test_completion_batch_of_prompts_and_token_ids(client, http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model="tiny", prompt=[ids, ids[:5]], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + 5
    texts = client.completions.create(model="tiny", prompt=[PROMPT, "The quick"], max_tokens=4, temperature=0)
    assert texts.choices[0].text == by_text.choices[0].text[: len(texts.choices[0].text)]


def test_completion_n_and_seed(client):
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "n": 3, "seed": 7,
                  "extra_body": {"ignore_eos": True}}
    completion = client.completions.create(**kwargs)
    assert sorted(c.index for c in completion.choices) == [0, 1, 2]
    assert completion.usage.completion_tokens == 30
    assert len({c.text for c in completion.choices}) > 1  # independent samples
    assert [c.text for c in client.completions.create(**kwargs).choices] == [c.text for c in completion.choices]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in completion.choices]


def test_completion_logprobs(client):
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                           extra_body={"ignore_eos": True})
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert chosen <= 0
        assert 1 <= len(top) <= 4
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_completion_echo_with_logprobs(client):
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                           logprobs=1)
    choice = completion.choices[0]
    assert choice.text.startswith(PROMPT)
    num_prompt = completion.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == num_prompt + 3
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(lp is not None for lp in choice.logprobs.token_logprobs[1:])


def test_stop_strings_and_stop_token_ids(client):
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kwargs).choices[0]
    text = full.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isascii()
                and text[i:i + 2].strip() == text[i:i + 2])
    expected = text[: text.index(stop)]
    stopped = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.text == expected and stopped.finish_reason == "stop"
    assert stopped.model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kwargs)
                       if c.choices)
    assert streamed == expected
    with_stop = client.completions.create(stop=stop, extra_body={"ignore_eos": True,
                                                                 "include_stop_str_in_output": True},
                                          **{k: v for k, v in kwargs.items() if k != "extra_body"})
    assert with_stop.choices[0].text == expected + stop
    every_token = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                            extra_body={"stop_token_ids": list(range(320))})
    assert every_token.choices[0].finish_reason == "stop" and every_token.usage.completion_tokens == 1
    assert isinstance(every_token.choices[0].model_extra["stop_reason"], int)


def test_chat_completion_and_stream(client):
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 15, "temperature": 0}
    chat = client.chat.completions.create(**kwargs)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 15
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == choice.finish_reason and all(f is None for f in finish[:-1])
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens


def test_chat_prompt_is_the_chat_template(client, http):
    tokenized = http.post("/tokenize", json={"messages": MESSAGES}).json()
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0)
    assert chat.usage.prompt_tokens == tokenized["count"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "The quick"}, {"type": "text", "text": "fox"}]}]
    as_parts = http.post("/tokenize", json={"messages": parts}).json()["tokens"]
    as_text = http.post("/tokenize", json={"messages": [{"role": "user", "content": "The quick\nfox"}]}).json()
    assert as_parts == as_text["tokens"]


def test_chat_max_tokens_default_is_the_rest_of_the_context(client):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.total_tokens == 1024
    limited = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                             max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert limited.usage.completion_tokens == 5


def test_chat_logprobs_and_n(client):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 4
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert entry.bytes == list(entry.token.encode())
    sampled = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, n=2, seed=1,
                                             temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in sampled.choices] == [0, 1] and sampled.usage.completion_tokens == 10
    streamed: dict[int, str] = {}
    roles = set()
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, n=2, seed=1,
                                                temperature=1.0, stream=True, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert roles == {0, 1}
    assert [streamed[i] for i in range(2)] == [c.message.content for c in sampled.choices]


def test_vllm_extra_sampling_fields(client):
    completion = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=3,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 8, "ignore_eos": True,
                    "skip_special_tokens": False, "prompt_logprobs": 2})
    choice = completion.choices[0]
    assert completion.usage.completion_tokens == 8
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == completion.usage.prompt_tokens


def test_raw_sse_framing(http):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


def test_tokenize_detokenize_round_trip(http):
    tokenized = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"])
    assert tokenized["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": PROMPT}


def test_metrics_after_requests(client, server):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(server.url_for("/metrics")).text
    for name in ("pagedllm:num_requests_running", "pagedllm:num_requests_waiting", "pagedllm:kv_cache_usage_perc",
                 "pagedllm:num_preemptions_total", "pagedllm:prompt_tokens_total",
                 "pagedllm:generation_tokens_total", 'pagedllm:request_success_total{finished_reason="length"',
                 "pagedllm:time_to_first_token_seconds_bucket", "pagedllm:inter_token_latency_seconds_count",
                 "pagedllm:e2e_request_latency_seconds_sum", "pagedllm:request_queue_time_seconds_bucket"):
        assert name in text, name
    metrics = server.metrics()
    assert metrics["pagedllm:generation_tokens_total"] >= 4
    assert metrics["pagedllm:e2e_request_latency_seconds_count"] >= 1


def test_api_key_is_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {server.api_key}"}):
        response = httpx.post(server.url_for("/v1/completions"), headers=headers,
                              json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and set(error) == {"message", "type", "param", "code"}
        assert httpx.get(server.url_for("/v1/models"), headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url_for("/v1"), api_key="wrong", max_retries=0).models.list()


def test_null_means_default_and_unknown_fields_are_ignored(http):
    body = {"model": None, "prompt": PROMPT, "max_tokens": 3, "n": None, "stream": None, "echo": None,
            "temperature": None, "store": True, "metadata": {"a": "b"}}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1 and response.json()["usage"]["completion_tokens"] <= 3
