"""Sliding-window (Mistral, Qwen2), Gemma 2/3 and Phi-3 models inside a busy batch with chunked prefill and
preemption: greedy tokens equal HF transformers' (float32, CPU). The single-prompt parity of the same variants is
in test_llm_parity.py (they are in TINY_MODEL_VARIANTS)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pagedllm import LLM
from pagedllm.config import ModelConfig
from tests.entrypoints.conftest import hf_greedy
from tests.entrypoints.test_llm_parity import assert_matches_hf, greedy, random_prompts
from tests.utils import load_hf_model, metric


def run_busy_batch(model_dir: str, prompts: list[list[int]], max_tokens: list[int]) -> None:
    # 24 blocks x 4 tokens cannot hold all requests at once: preemption; a 48-token budget chunks long prompts.
    llm = LLM(model_dir, device="cpu", block_size=4, num_gpu_blocks_override=24, max_num_batched_tokens=48,
              max_num_seqs=16, max_model_len=96)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m) for m in max_tokens],
                           use_tqdm=False)
    assert metric(llm, "num_preemptions_total") > 0
    hf_model = load_hf_model(model_dir)
    for prompt, limit, output in zip(prompts, max_tokens, outputs):
        assert_matches_hf(output, hf_greedy(hf_model, prompt, limit)[0])
    assert metric(llm, "kv_cache_usage_perc") == 0.0


@pytest.mark.parametrize("arch", ["mistral_window", "qwen2_window", "gemma2", "gemma3"])
def test_windowed_models_in_a_busy_batch_match_hf(tiny_model, arch):
    """Windows of 8 tokens under prompts of up to 70, chunked by 48: chunks attend across the window's edge."""
    prompts = random_prompts(24, 320, seed=1)
    assert any(len(p) > 48 for p in prompts)
    run_busy_batch(tiny_model(arch), prompts, [random.Random(i).randint(1, 20) for i in range(24)])


@pytest.mark.parametrize("arch", ["phi3_longrope", "phi4_mini"])
def test_phi3_longrope_in_a_busy_batch_matches_hf(tiny_model, arch):
    """Prompts within the original length (32), outputs that pass it: short factors, then long ones."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(1, 32))] for _ in range(24)]
    max_tokens = [rng.randint(5, 40) for _ in range(24)]
    assert sum(len(p) + m > 33 for p, m in zip(prompts, max_tokens)) > 10
    run_busy_batch(tiny_model(arch), prompts, max_tokens)


def test_windowed_models_are_not_capped_at_their_window(tiny_model):
    for arch in ("mistral_window", "gemma2", "qwen2_window"):
        config = ModelConfig.from_pretrained(tiny_model(arch), None)
        assert config.max_model_len == config.max_position_embeddings == 256


def test_gemma3_multimodal_checkpoint_is_refused_clearly(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 64}, "vision_config": {}}))
    with pytest.raises(ValueError, match="multimodal .* not supported"):
        ModelConfig.from_pretrained(str(tmp_path), None)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_triton_attention_backend_matches_hf(tiny_model, arch, monkeypatch):
    """The model over the Triton kernels (Triton's interpreter on CPU): windows and soft caps in the prefill kernel
    (chunks of 16 over 8-token windows) and in the decode kernel."""
    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    model_dir = tiny_model(arch)
    llm = LLM(model_dir, device="cpu", block_size=4, num_gpu_blocks_override=64, max_num_batched_tokens=16,
              max_num_seqs=4, max_model_len=96)
    prompts = random_prompts(3, 320, seed=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    hf_model = load_hf_model(model_dir)
    for prompt, output in zip(prompts, outputs):
        assert_matches_hf(output, hf_greedy(hf_model, prompt, 12)[0])
