"""Reference architectures: name resolution, config values as HF reads them, parameter and byte counts."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from pagedllm.bench.models import (
    CONFIGS_DIR,
    load_model_config,
    model_label,
    num_parameters,
    resolve_model,
    weight_bytes_per_step,
)
from tests.utils import build_tiny_model


def test_reference_names_resolve_to_shipped_configs(tmp_path):
    assert resolve_model("qwen3-0.6b") == str(CONFIGS_DIR / "qwen3-0.6b")
    assert resolve_model("Llama-3.1-8B") == str(CONFIGS_DIR / "llama-3.1-8b")
    assert resolve_model("Qwen/Qwen2.5-1.5B") == str(CONFIGS_DIR / "qwen2.5-1.5b")
    assert model_label("qwen3-0.6b") == "Qwen/Qwen3-0.6B"
    assert resolve_model("someone/other-model") == "someone/other-model"
    local = tmp_path / "qwen3-0.6b"
    local.mkdir()
    assert resolve_model(str(local)) == str(local)  # an existing path always wins


# name -> (parameters, published in the model cards / HF's own count), key values of the public config.json
REFERENCES = {
    "qwen3-0.6b": (596_049_920, {"vocab_size": 151936, "num_hidden_layers": 28, "num_key_value_heads": 8,
                                 "head_dim": 128, "intermediate_size": 3072, "tie_word_embeddings": True}),
    "qwen2.5-1.5b": (1_543_714_304, {"vocab_size": 151936, "num_hidden_layers": 28, "num_key_value_heads": 2,
                                     "intermediate_size": 8960, "tie_word_embeddings": True}),
    "llama-3.1-8b": (8_030_261_248, {"vocab_size": 128256, "num_hidden_layers": 32, "num_key_value_heads": 8,
                                     "intermediate_size": 14336, "tie_word_embeddings": False}),
    "qwen3-30b-a3b": (30_532_122_624, {"vocab_size": 151936, "num_hidden_layers": 48, "num_key_value_heads": 4,
                                       "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                                       "tie_word_embeddings": False}),
}


KV_SCALES = 2  # parameters per layer that HF's models lack: the KV cache's k_scale and v_scale


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_config_matches_hf_architecture(name):
    expected_params, values = REFERENCES[name]
    raw = json.loads((CONFIGS_DIR / name / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16"
    assert {key: raw[key] for key in values} == values
    config = load_model_config(resolve_model(name), "auto", "cuda")
    assert config.dtype == "bfloat16"
    hf_config = transformers.AutoConfig.from_pretrained(resolve_model(name))
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    # pagedllm's layers also hold the KV cache's two scales (k_scale, v_scale: one float each)
    assert num_parameters(config) - KV_SCALES * config.num_hidden_layers == expected_params
    assert sum(p.numel() for p in hf_model.parameters()) == expected_params


def test_llama31_rope_scaling():
    config = load_model_config(resolve_model("llama-3.1-8b"), "auto", "cuda")
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config.max_position_embeddings == 131072


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_tied", "mistral"])
def test_num_parameters_matches_hf_on_tiny_models(tmp_path, arch):
    model_dir = build_tiny_model(tmp_path, arch)
    config = load_model_config(model_dir, "float32", "cpu")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    kv_scales = KV_SCALES * config.num_hidden_layers
    assert num_parameters(config) - kv_scales == sum(p.numel() for p in hf_model.parameters())
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    assert weight_bytes_per_step(config) == 4 * (num_parameters(config) - embedding)


def test_moe_weight_bytes_count_the_experts_a_step_routes_to():
    """Qwen3-30B-A3B: one token reads 8 of 128 experts per layer (~3.0B of 30.5B parameters with the LM head, the
    input embedding excluded); a big batch reads nearly all of them."""
    config = load_model_config(resolve_model("qwen3-30b-a3b"), "auto", "cuda")
    expert_params = 48 * 128 * 3 * 2048 * 768
    kv_scales = KV_SCALES * 48  # float32: 2 more bytes each
    dense_read = num_parameters(config) - expert_params - 151936 * 2048  # input embedding not read whole
    assert weight_bytes_per_step(config) == 2 * (dense_read + expert_params * 8 // 128) + 2 * kv_scales
    many = weight_bytes_per_step(config, tokens_per_step=256)
    assert 2 * (dense_read + 0.999 * expert_params) < many < 2 * (dense_read + expert_params)


@pytest.mark.parametrize(("quantization", "bytes_per_weight"), [("gptq", (0.5, 0.53)), ("awq", (0.5, 0.53)),
                                                                  ("fp8", (1.0, 1.001))])
def test_quantized_runs_read_their_weights_at_the_stored_size(quantization, bytes_per_weight):
    """``--quantization`` on a dense config (dummy weights) is in the roofline: Llama-3.1-8B's projections are read
    at 4 bits plus group scales (GPTQ, AWQ) or 8 bits plus channel scales (FP8); the LM head and norms stay 16-bit."""
    model_dir = resolve_model("llama-3.1-8b")
    projections = 32 * (4096 * 6144 + 4096 * 4096 + 2 * 4096 * 14336 + 14336 * 4096)
    dense = weight_bytes_per_step(load_model_config(model_dir, "auto", "cuda"))
    quantized = weight_bytes_per_step(load_model_config(model_dir, "auto", "cuda", quantization))
    low, high = bytes_per_weight
    assert low * projections <= quantized - (dense - 2 * projections) <= high * projections
