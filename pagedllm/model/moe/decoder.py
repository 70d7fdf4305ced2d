"""Decoder layer, model and causal LM shared by the MoE families (Qwen3-MoE, Mixtral).

Attention is the Llama family's (``llama.LlamaAttention``); the feed-forward of a layer is either a
``SparseMoeBlock`` (router + ``FusedMoE``) or, where the family keeps some layers dense, ``llama.LlamaMLP``. What
differs between families (which layers are sparse, how routing weights are normalized, the checkpoint names of the
block and of the experts' projections) is an ``MoESpec`` their module builds from config.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.config import ModelConfig
from pagedllm.model.layers import (
    LMHead,
    RMSNorm,
    RotaryEmbedding,
    RotaryStep,
    VocabEmbedding,
    linear_add_rms_norm,
    linear_norm_linear,
    rms_norm_linear,
)
from pagedllm.model.linear import Linear
from pagedllm.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaVariant
from pagedllm.model.moe.layer import FusedMoE, expert_params_mapping
from pagedllm.model.quantization.base import QuantizationConfig


@dataclass(frozen=True)
class MoESpec:
    """How a family lays out and routes its experts."""

    num_experts: int
    top_k: int
    moe_intermediate_size: int
    renormalize: bool  # renormalize the top-k weights to sum to 1
    round_weights_to_dtype: bool  # round the routing weights to the activation dtype (Qwen3-MoE) or keep float32
    is_sparse_layer: Callable[[int], bool]  # layer index -> MoE block (True) or dense MLP
    block_name: str  # the feed-forward's module name in the checkpoint ("mlp", "block_sparse_moe")
    expert_names: tuple[str, str, str]  # checkpoint names of an expert's gate, down, up projections


class SparseMoeBlock(nn.Module):
    """Router (``gate``: hidden -> one logit per expert, kept dense) and the experts."""

    def __init__(self, config: ModelConfig, spec: MoESpec, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.gate = Linear(config.hidden_size, spec.num_experts, bias=False)  # tiny and routing-critical: unquantized
        self.experts = FusedMoE(spec.num_experts, spec.top_k, config.hidden_size, spec.moe_intermediate_size,
                                spec.renormalize, spec.round_weights_to_dtype, quant_config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class MoEDecoderLayer(nn.Module):
    """Pre-norm block: Llama attention, then a sparse MoE block or a dense MLP under the family's module name."""

    def __init__(self, config: ModelConfig, variant: LlamaVariant, spec: MoESpec, layer_index: int,
                 attn_backend: AttentionBackend, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_index}"
        self.self_attn = LlamaAttention(config, variant, attn_backend, quant_config, f"{prefix}.self_attn")
        self.block_name = spec.block_name
        block = (SparseMoeBlock(config, spec, quant_config) if spec.is_sparse_layer(layer_index)
                 else LlamaMLP(config, variant, quant_config, f"{prefix}.{spec.block_name}"))
        self.add_module(spec.block_name, block)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, rope: RotaryStep,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = rms_norm_linear(self.input_layernorm, self.self_attn.qkv_proj, hidden_states, residual)
        attended = self.self_attn(qkv, rope, kv_cache, attn_metadata)
        block = getattr(self, self.block_name)
        if isinstance(block, LlamaMLP):  # dense layer: its norm may fuse into o or gate_up, as in Llama
            gate_up, residual = linear_norm_linear(self.self_attn.o_proj, attended, residual,
                                                   self.post_attention_layernorm, block.gate_up_proj)
            return block(gate_up), residual
        normed, residual = linear_add_rms_norm(self.self_attn.o_proj, attended, residual,
                                               self.post_attention_layernorm)
        return block(normed), residual


class MoEModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.*``)."""

    def __init__(self, config: ModelConfig, variant: LlamaVariant, spec: MoESpec, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_model_len, config.rope_theta,
                                          config.rope_scaling)
        self.layers = nn.ModuleList(MoEDecoderLayer(config, variant, spec, i, attn_backend, quant_config)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        rope = self.rotary_emb.step_inputs(positions, hidden_states.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(hidden_states, residual, rope, kv_cache, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class MoEForCausalLM(LlamaForCausalLM):
    """A causal LM whose feed-forwards are (mostly) mixtures of experts; subclasses supply the spec and the
    attention variant of their family. ``forward`` and ``compute_logits`` are Llama's."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config
        spec = self.moe_spec(config)
        self.model = MoEModel(config, self.attention_variant(config), spec, attn_backend, quant_config)
        tied_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied_to)
        # Expert rules first: the dense MLP's ".gate_proj." would also match an expert's name.
        self.stacked_params_mapping = (expert_params_mapping(spec.num_experts, *spec.expert_names)
                                       + LlamaForCausalLM.stacked_params_mapping)

    @classmethod
    def moe_spec(cls, config: ModelConfig) -> MoESpec:
        raise NotImplementedError

    @classmethod
    def attention_variant(cls, config: ModelConfig) -> LlamaVariant:
        raise NotImplementedError


def reject_unsupported(hf: dict, architecture: str, keys: dict[str, object]) -> None:
    """Raise if config.json asks for a feature we do not implement: ``keys`` maps each config key to the only
    value (or "falsy") we accept."""
    for key, accepted in keys.items():
        value = hf.get(key)
        ok = not value if accepted == "falsy" else value in (None, accepted)
        if not ok:
            raise ValueError(f"{architecture} with {key}={value!r} is not supported by pagedllm")
