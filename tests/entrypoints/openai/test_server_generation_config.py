"""Request defaults (``--generation-config``, ``--max-tokens-default``, ``LLM(generation_config=...)``): the model's
generation_config.json fills the sampling fields a request leaves unset, and a reply without max_tokens is bounded."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pagedllm.entrypoints.generation_config import (
    DEFAULT_SERVING_MAX_TOKENS,
    GenerationDefaults,
    load_generation_defaults,
    serving_defaults,
)
from pagedllm.entrypoints.openai.server import build_app
from tests.entrypoints.openai.conftest import ENGINE_KWARGS, serve_args

HELLO = {"messages": [{"role": "user", "content": "Hello"}], "ignore_eos": True}


def write_generation_config(directory, **values) -> str:
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "do_sample": True, **values}))
    return str(directory)


def test_reads_the_sampling_keys_vllm_reads(tmp_path):
    path = write_generation_config(tmp_path, temperature=0.3, top_k=5, max_new_tokens=7, num_beams=4)
    assert load_generation_defaults(path, "unused") == GenerationDefaults(temperature=0.3, top_k=5, max_tokens=7)
    assert load_generation_defaults("auto", path) == load_generation_defaults(path, "unused")
    assert load_generation_defaults("vllm", path) == GenerationDefaults()
    assert load_generation_defaults("auto", str(tmp_path / "model.gguf")) == GenerationDefaults()  # none beside


def test_bad_generation_configs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no generation_config.json there"):
        load_generation_defaults(str(tmp_path), "unused")
    path = write_generation_config(tmp_path, top_p=2.0)
    with pytest.raises(ValueError, match="generation_config.json: .*top_p"):
        load_generation_defaults(path, "unused")


def test_the_servers_max_tokens_default():
    model = GenerationDefaults(temperature=0.5, max_tokens=7)
    assert serving_defaults(model, None) == model  # the model's max_new_tokens
    assert serving_defaults(GenerationDefaults(), None).max_tokens == DEFAULT_SERVING_MAX_TOKENS
    assert serving_defaults(model, 3) == GenerationDefaults(temperature=0.5, max_tokens=3)  # the flag wins
    assert serving_defaults(model, 0).max_tokens is None  # no bound but the context
    with pytest.raises(ValueError, match="--max-tokens-default"):
        serving_defaults(model, -1)


def serve(engine, *flags: str) -> TestClient:
    return TestClient(build_app(engine, serve_args(*flags)))


def test_defaults_fill_what_a_request_leaves_unset(engine, tmp_path):
    client = serve(engine, "--generation-config", write_generation_config(tmp_path, temperature=0.0,
                                                                          max_new_tokens=5))
    reply = client.post("/v1/chat/completions", json=HELLO).json()
    assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["finish_reason"] == "length"
    greedy = client.post("/v1/chat/completions", json={**HELLO, "temperature": 0, "max_tokens": 5}).json()
    assert reply["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    asked = client.post("/v1/chat/completions", json={**HELLO, "max_tokens": 2}).json()
    assert asked["usage"]["completion_tokens"] == 2  # the request's own value wins
    null = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": None, "ignore_eos": True}).json()
    assert null["usage"]["completion_tokens"] == 5  # completions: an explicit null takes the default too
    unset = client.post("/v1/completions", json={"prompt": "Hello", "ignore_eos": True}).json()
    assert unset["usage"]["completion_tokens"] == 16  # OpenAI's default for completions stays


def test_max_tokens_default_bounds_a_chat_reply(engine):
    reply = serve(engine, "--max-tokens-default", "3").post("/v1/chat/completions", json=HELLO).json()
    assert reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["finish_reason"] == "length"


def test_llm_takes_its_defaults_from_the_generation_config(server_model_dir, tmp_path):
    from pagedllm import LLM

    path = write_generation_config(tmp_path, temperature=0.7, top_p=0.9, max_new_tokens=4)
    llm = LLM(server_model_dir, generation_config=path, **ENGINE_KWARGS)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.max_tokens) == (0.7, 0.9, 4)
    output = llm.generate("Hello", use_tqdm=False)[0].outputs[0]
    assert len(output.token_ids) <= 4
    assert LLM(server_model_dir, generation_config="vllm", **ENGINE_KWARGS).get_default_sampling_params().max_tokens \
        == 16
