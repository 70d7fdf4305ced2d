"""One set of end-of-sequence ids for the whole engine: an eos listed only in generation_config.json (as
Llama-3-Instruct lists ``<|eot_id|>``) stops generation *and* is banned while ``min_tokens`` is not reached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3]
KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=64, max_model_len=64, skip_tokenizer_init=True)
GENERATION_ONLY_EOS = 250  # not the config's eos, nor the tokenizer's


@pytest.fixture(scope="module")
def model_with_generation_config_eos(tiny_model, tmp_path_factory) -> str:
    model_dir = Path(tmp_path_factory.mktemp("eos")) / "llama"
    shutil.copytree(tiny_model("llama"), model_dir)
    config_eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    assert config_eos != GENERATION_ONLY_EOS
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [config_eos, GENERATION_ONLY_EOS]}))
    return str(model_dir)


@pytest.fixture(scope="module")
def llm(model_with_generation_config_eos) -> LLM:
    return LLM(model_with_generation_config_eos, **KWARGS)


def test_the_engine_holds_one_resolved_set(llm) -> None:
    engine = llm.llm_engine
    assert GENERATION_ONLY_EOS in engine.config.model_config.eos_token_ids
    assert engine.input_processor.eos_token_ids == engine.config.model_config.eos_token_ids
    assert engine.engine_core.model_runner.model_config.eos_token_ids == engine.config.model_config.eos_token_ids


def test_generation_config_eos_stops_generation(llm) -> None:
    # A huge bias makes the generation-only eos the greedy choice at once.
    params = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={GENERATION_ONLY_EOS: 100.0})
    output = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0].outputs[0]
    assert output.token_ids == [GENERATION_ONLY_EOS]
    assert output.finish_reason == "stop"


def test_generation_config_eos_is_banned_during_min_tokens(llm) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, logit_bias={GENERATION_ONLY_EOS: 100.0})
    output = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0].outputs[0]
    assert GENERATION_ONLY_EOS not in output.token_ids[:3]
    assert output.token_ids[3:] == [GENERATION_ONLY_EOS]  # allowed (and then chosen) once min_tokens is reached
    assert output.finish_reason == "stop"
