"""Which class implements each Hugging Face architecture (an entry of config.json's ``architectures``).

Torch-free and import-light: ``config.py`` validates architectures against it, and a model module is imported
only when a model of its family is built. Adding a family is one module in ``model/`` plus its lines here; what is
special about the family (biases, norms, weight names) lives in its module.
"""

from __future__ import annotations

import importlib

# architecture -> "module:class"
_MODELS: dict[str, str] = {
    "Gemma2ForCausalLM": "pagedllm.model.gemma:GemmaForCausalLM",
    "Gemma3ForCausalLM": "pagedllm.model.gemma:GemmaForCausalLM",
    "LlamaForCausalLM": "pagedllm.model.llama:LlamaForCausalLM",
    "MistralForCausalLM": "pagedllm.model.llama:LlamaForCausalLM",
    "Phi3ForCausalLM": "pagedllm.model.phi3:Phi3ForCausalLM",
    "Qwen2ForCausalLM": "pagedllm.model.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "pagedllm.model.llama:LlamaForCausalLM",
    "Qwen3MoeForCausalLM": "pagedllm.model.qwen3_moe:Qwen3MoeForCausalLM",
    "MixtralForCausalLM": "pagedllm.model.mixtral:MixtralForCausalLM",
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)

# A checkpoint saved from HF's base model (``AutoModel``: sentence-transformers exports, some embedding models) names
# the base class in config.json; it runs as the causal LM of its family (its weights lack the ``model.`` prefix and
# the LM head: the loader maps the names, and only a pooling engine runs it without a head).
BASE_MODEL_ARCHITECTURES: dict[str, str] = {
    "Gemma2Model": "Gemma2ForCausalLM",
    "Gemma3TextModel": "Gemma3ForCausalLM",
    "LlamaModel": "LlamaForCausalLM",
    "MistralModel": "MistralForCausalLM",
    "Phi3Model": "Phi3ForCausalLM",
    "Qwen2Model": "Qwen2ForCausalLM",
    "Qwen3Model": "Qwen3ForCausalLM",
    "Qwen3MoeModel": "Qwen3MoeForCausalLM",
    "MixtralModel": "MixtralForCausalLM",
}

# Architectures refused with a pointer to what does run.
UNSUPPORTED_HINTS: dict[str, str] = {
    "Gemma3ForConditionalGeneration": "Gemma 3's multimodal (image + text) checkpoints are not supported; the "
                                      "text-only ones (Gemma3ForCausalLM, e.g. google/gemma-3-1b-it) are",
}


def model_class(architecture: str) -> type:
    """The model class implementing ``architecture``, its module imported on first use."""
    if architecture not in _MODELS:
        raise ValueError(
            f"Unsupported model architecture {architecture!r}; pagedllm supports: {', '.join(_MODELS)}"
        )
    module_name, class_name = _MODELS[architecture].split(":")
    return getattr(importlib.import_module(module_name), class_name)
