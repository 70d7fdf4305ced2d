"""Reference architectures shipped as ``config.json`` files (no weights), and the byte counts the roofline needs.

``--model qwen3-0.6b`` resolves to ``pagedllm/bench/configs/qwen3-0.6b``; with ``load_format="dummy"`` the engine
builds the architecture with random weights, so no download and no tokenizer are needed. Any local model directory
(or hub id) is passed through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pagedllm.config import ModelConfig
from pagedllm.entrypoints.default_model import is_default_model, model_or_default
from pagedllm.model.loader import build_model, process_weights_after_loading

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# The public hub id of each shipped reference configuration, for records and for resolving a hub id by name.
REFERENCE_MODELS: dict[str, str] = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",  # multi-GPU (tensor / pipeline parallel) runs
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
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


def load_model_config(model_dir: str, dtype: str, device: str, quantization: str | None = None) -> ModelConfig:
    """The model's config as the engine resolves it, with ``quantization`` (``--quantization``) applied: a dense
    checkpoint run as GPTQ or FP8 reads its weights at their quantized size, and the roofline must say so."""
    return ModelConfig.from_pretrained(model_dir, None, dtype, device, quantization=quantization)


def _parameters_on_meta(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's parameters as built for ``config`` (any family, quantized layers at their stored dtypes, after
    their load-time repacking or quantization), on the meta device: shapes and dtypes, no memory."""
    model = build_model(config, "meta")
    process_weights_after_loading(model)
    return dict(model.named_parameters())  # tied weights once


def num_parameters(config: ModelConfig) -> int:
    """Parameters of the model described by ``config`` (tied embeddings counted once; packed values count as
    their storage elements)."""
    return sum(param.numel() for param in _parameters_on_meta(config).values())


def weight_bytes_per_step(config: ModelConfig, tokens_per_step: int = 1) -> int:
    """Weight bytes one forward step of ``tokens_per_step`` tokens must read: every parameter at its stored size
    (quantized ones included) except the input embedding table, of which a step reads only its tokens' rows (with
    tied embeddings the table is read whole, as the LM head). Of a MoE layer's experts only those the step's tokens
    route to are read: ``expert_fraction_read``."""
    params = _parameters_on_meta(config)
    total = sum(_bytes(param) * expert_fraction_read(param, tokens_per_step) for param in params.values())
    if not config.tie_word_embeddings:
        total -= _bytes(params["model.embed_tokens.weight"])
    return round(total)


def _bytes(param: torch.Tensor) -> int:
    return param.numel() * param.element_size()


def expert_fraction_read(param: torch.Tensor, tokens_per_step: int) -> float:
    """The share of an expert-stacked parameter (``moe_routing`` = (top_k, num_experts), see ``model/moe/layer.py``)
    that a step reads: exactly top_k / E for one token; for n tokens routed independently and uniformly, the expected
    share of experts hit, 1 - (1 - top_k / E)^n (real routing is skewed and hits fewer, so for n > 1 this may overcount). 1 for
    any other parameter."""
    routing = getattr(param, "moe_routing", None)
    if routing is None:
        return 1.0
    top_k, num_experts = routing
    return 1.0 - (1.0 - top_k / num_experts) ** max(1, tokens_per_step)
