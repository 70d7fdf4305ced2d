"""Reference architectures shipped as ``config.json`` files (no weights), and the byte counts the roofline needs.

``--model qwen3-0.6b`` resolves to ``pagedllm/bench/configs/qwen3-0.6b``; with ``load_format="dummy"`` the engine
builds the architecture with random weights, so no download and no tokenizer are needed. Any local model directory
(or hub id) is passed through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from pagedllm.config import ModelConfig
from pagedllm.entrypoints.default_model import is_default_model, model_or_default

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# The public hub id of each shipped reference configuration, for records and for resolving a hub id by name.
REFERENCE_MODELS: dict[str, str] = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
}


def reference_model_names() -> list[str]:
    return sorted(REFERENCE_MODELS)


def resolve_model(model: str) -> str:
    """A local path for ``model``: an existing path as is, a reference name (``qwen3-0.6b``, case-insensitive, or its
    hub id ``Qwen/Qwen3-0.6B``) as the shipped config directory, the default model's name
    (``SmolLM2-135M-Instruct``) as its installed GGUF file; anything else unchanged (a hub id)."""
    if os.path.exists(model):
        return model
    if is_default_model(model):
        return model_or_default(model)
    key = model.lower()
    by_hub_id = {hub_id.lower(): name for name, hub_id in REFERENCE_MODELS.items()}
    name = key if key in REFERENCE_MODELS else by_hub_id.get(key)
    return str(CONFIGS_DIR / name) if name else model


def model_label(model: str) -> str:
    """How a model is named in records: the reference's hub id, else the path or id given."""
    resolved = Path(resolve_model(model))
    if resolved.parent == CONFIGS_DIR:
        return REFERENCE_MODELS[resolved.name]
    return model


def load_model_config(model_dir: str, dtype: str, device: str) -> ModelConfig:
    return ModelConfig.from_pretrained(model_dir, None, dtype, device)


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def num_parameters(config: ModelConfig) -> int:
    """Parameters of the Llama-family architecture described by ``config`` (tied embeddings counted once)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    attention = hidden * (q_size + 2 * kv_size) + q_size * hidden
    attention += (q_size + 2 * kv_size) if config.qkv_bias else 0
    attention += hidden if config.o_bias else 0
    attention += 2 * head_dim if config.qk_norm else 0
    mlp = 3 * hidden * config.intermediate_size
    mlp += (2 * config.intermediate_size + hidden) if config.mlp_bias else 0
    layer = attention + mlp + 2 * hidden  # + the two RMSNorm weights
    embedding = config.vocab_size * hidden
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * hidden
    return config.num_hidden_layers * layer + hidden + embedding + lm_head


def weight_bytes_per_step(config: ModelConfig) -> int:
    """Weight bytes one forward step must read: every parameter except the input embedding table, of which a step
    reads only its tokens' rows (with tied embeddings the table is read whole, as the LM head)."""
    untied_embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return (num_parameters(config) - untied_embedding) * dtype_bytes(config.dtype)
