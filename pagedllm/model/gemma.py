"""Gemma 2 and Gemma 3 (text): ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``.

What sets them apart from the Llama family, all read from config.json here:

- sliding-window layers alternating with global ones (``layer_types``; else Gemma 2 windows every other layer and
  Gemma 3 all but every ``sliding_window_pattern``-th); Gemma 3's local layers rotate with their own theta
  (``rope_local_base_freq``, or ``rope_parameters["sliding_attention"]`` in transformers 5), its global layers
  with ``rope_scaling`` (``rope_parameters["full_attention"]``);
- attention logit soft-capping (Gemma 2: ``cap * tanh(scores / cap)`` inside the attention backend) and final
  logit soft-capping on the LM head's output;
- the (1 + weight) RMSNorm, computed in float32 and cast after the multiply (HF's order), four per layer (before
  and after attention, before and after the feed-forward), and Gemma 3's per-head q/k norm of the same kind;
- embeddings scaled by sqrt(hidden_size) (the factor rounded to the model's dtype, as HF does), scores scaled by
  ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``, a GeLU (tanh) gated MLP, tied embeddings.

The norms run as plain torch ops on every device (the fused RMSNorm kernels implement Llama's ``w * x``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.config import ModelConfig
from pagedllm.distributed.parallel_state import get_parallel_state, layer_range
from pagedllm.model.kv_scales import calibrate_kv_scales, kv_scale_parameter
from pagedllm.model.layers import (
    LMHead,
    PPMissingLayer,
    RotaryEmbedding,
    RotaryStep,
    VocabEmbedding,
    rotate_qk,
    rotate_qk_into_cache,
)
from pagedllm.model.linear import Linear, MergedLinear, QKVLinear, default_weight_loader, set_weight_loader
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.quantization.base import QuantizationConfig

_GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _rope_of(params: dict[str, Any] | None, default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling for ``compute_inv_freq`` or None) of one layer type's rope settings."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", default_theta))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    return theta, (None if rope_type == "default" else {"rope_type": rope_type, **params})


@dataclass(frozen=True)
class GemmaVariant:
    """Gemma 2 / Gemma 3 specifics, read from config.json."""

    is_gemma3: bool
    scale: float  # query_pre_attn_scalar ** -0.5
    attn_soft_cap: float  # 0 = off
    final_soft_cap: float  # 0 = off
    layer_windows: tuple[int, ...]  # per layer: the sliding window, 0 = global
    global_rope: tuple[float, dict[str, Any] | None]  # (theta, scaling)
    local_rope: tuple[float, dict[str, Any] | None]
    gelu_approximate: str  # F.gelu's approximate=

    @classmethod
    def of(cls, config: ModelConfig) -> GemmaVariant:
        hf, is_gemma3 = config.hf_config, config.architecture == "Gemma3ForCausalLM"
        if hf.get("use_bidirectional_attention"):
            raise ValueError("Gemma with use_bidirectional_attention (an encoder) is not supported")
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in _GELU_APPROXIMATIONS:
            raise ValueError(f"Unsupported Gemma hidden_activation {activation!r}; supported: "
                             f"{', '.join(_GELU_APPROXIMATIONS)}")
        global_rope, local_rope = cls._ropes(hf, is_gemma3)
        return cls(
            is_gemma3=is_gemma3,
            scale=float(hf.get("query_pre_attn_scalar") or config.head_dim) ** -0.5,
            attn_soft_cap=float(hf.get("attn_logit_softcapping") or 0.0),
            final_soft_cap=float(hf.get("final_logit_softcapping") or 0.0),
            layer_windows=cls._windows(hf, config.num_hidden_layers, is_gemma3),
            global_rope=global_rope,
            local_rope=local_rope,
            gelu_approximate=_GELU_APPROXIMATIONS[activation],
        )

    @staticmethod
    def _windows(hf: dict[str, Any], num_layers: int, is_gemma3: bool) -> tuple[int, ...]:
        window = hf.get("sliding_window") or 0
        layer_types = hf.get("layer_types")
        if not layer_types:
            pattern = int(hf.get("sliding_window_pattern") or 6) if is_gemma3 else 2
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types[:num_layers])

    @staticmethod
    def _ropes(hf: dict[str, Any], is_gemma3: bool):
        params = hf.get("rope_parameters") or {}
        if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one dict per layer type
            global_rope = _rope_of(params.get("full_attention"), 1_000_000.0)
            return global_rope, _rope_of(params.get("sliding_attention"), 10_000.0)
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
        global_rope = _rope_of({**(hf.get("rope_scaling") or {}), **params, "rope_theta": theta}, theta)
        if not is_gemma3:  # Gemma 2: one rotary for all layers
            return global_rope, global_rope
        return global_rope, (float(hf.get("rope_local_base_freq", 10_000.0)), None)


class GemmaRMSNorm(nn.Module):
    """RMSNorm with a ``(1 + weight)`` gain, in float32, cast to the input's dtype after the multiply (HF's order)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(nn.Module):
    """Self-attention of one Gemma layer: its window, soft cap and (Gemma 3) q/k norm."""

    def __init__(self, config: ModelConfig, variant: GemmaVariant, layer_index: int, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = bool(config.hf_config.get("attention_bias", False))
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=bias,
                                  quant_config=quant_config, prefix=prefix)
        # This rank's heads under tensor parallelism: the q/k norms and the soft cap act within each head.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = Linear(num_heads * self.head_dim, config.hidden_size, bias=bias,
                             quant_config=quant_config, prefix=f"{prefix}.o_proj", parallel="row")
        if variant.is_gemma3:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = variant.scale
        self.sliding_window = variant.layer_windows[layer_index]
        self.soft_cap = variant.attn_soft_cap
        self.attn_backend = attn_backend
        self.k_scale = kv_scale_parameter()
        self.v_scale = kv_scale_parameter()

    def forward(self, hidden_states: torch.Tensor, rope: RotaryStep, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # (1 + w) norms: applied here, not by the fused rotary kernel (Llama's w * x)
            q, k = self.q_norm(q), self.k_norm(k)
        if attn_metadata.compute_kv_scales:
            q, k = rotate_qk(q, k, rope)
            calibrate_kv_scales(k, v, self.k_scale, self.v_scale, kv_cache.dtype)
        else:
            q, k, v = rotate_qk_into_cache(q, k, v, rope, None, None, kv_cache, attn_metadata.slot_mapping,
                                           self.k_scale, self.v_scale)
        out = self.attn_backend.forward(q, k, v, kv_cache, attn_metadata, self.scale, self.k_scale, self.v_scale,
                                        sliding_window=self.sliding_window, logits_soft_cap=self.soft_cap)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class GemmaMLP(nn.Module):
    """``down(gelu(gate(x)) * up(x))``, gate and up fused into one GEMM."""

    def __init__(self, config: ModelConfig, variant: GemmaVariant, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], quant_config=quant_config, prefix=prefix,
                                         part_names=["gate_proj", "up_proj"])
        self.down_proj = Linear(size, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.down_proj",
                                parallel="row")
        self.approximate = variant.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)


class GemmaDecoderLayer(nn.Module):
    """Gemma 2/3 block: a norm before and after both attention and the MLP (the "sandwich"), residual adds after."""

    def __init__(self, config: ModelConfig, variant: GemmaVariant, layer_index: int, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.is_sliding = variant.layer_windows[layer_index] > 0
        self.self_attn = GemmaAttention(config, variant, layer_index, attn_backend, quant_config,
                                        f"{prefix}.self_attn")
        self.mlp = GemmaMLP(config, variant, quant_config, f"{prefix}.mlp")
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, hidden_states: torch.Tensor, global_rope: RotaryStep, local_rope: RotaryStep,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        rope = local_rope if self.is_sliding else global_rope
        attn = self.self_attn(self.input_layernorm(hidden_states), rope, kv_cache, attn_metadata)
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp)


class GemmaModel(nn.Module):
    """Scaled embeddings, the decoder layers and the final norm (HF's ``model.*``).

    Under pipeline parallelism this stage holds decoder layers ``[start_layer, end_layer)`` (the others are
    ``PPMissingLayer``), the embedding on the first stage (and on the last, for the tied LM head) and the final
    norm on the last; stages pass the hidden states on (Gemma's residual adds are not fused into its norms)."""

    def __init__(self, config: ModelConfig, variant: GemmaVariant, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None, tie_word_embeddings: bool) -> None:
        super().__init__()
        self.pp = get_parallel_state().pp
        self.hidden_size = config.hidden_size
        self.dtype = torch.get_default_dtype()  # the model's (the loader builds it under that default)
        self.start_layer, self.end_layer = layer_range(config.num_hidden_layers, self.pp.rank, self.pp.size)
        has_embedding = self.pp.is_first or (tie_word_embeddings and self.pp.is_last)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size) if has_embedding \
            else PPMissingLayer()
        self.embed_scale = math.sqrt(config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_model_len, *variant.global_rope)
        self.local_rotary_emb = (self.rotary_emb if variant.local_rope == variant.global_rope
                                 else RotaryEmbedding(config.head_dim, config.max_model_len, *variant.local_rope))
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, variant, i, attn_backend, quant_config, f"model.layers.{i}")
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps) if self.pp.is_last else PPMissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """``kv_caches``: one per layer of this stage (every layer without pipeline parallelism)."""
        pp = self.pp
        if pp.is_first:
            embeddings = self.embed_tokens(input_ids)
            # HF multiplies by sqrt(hidden_size) held as a tensor of the weights' dtype (bf16 rounds it).
            hidden_states = embeddings * torch.tensor(self.embed_scale, dtype=embeddings.dtype)
        else:  # a later pipeline stage: the hidden states the stage before sent
            shape = (input_ids.shape[0], self.hidden_size)
            hidden_states = pp.comm.recv(torch.empty(shape, dtype=self.dtype, device=input_ids.device), pp.rank - 1)
        global_rope = self.rotary_emb.step_inputs(positions, hidden_states.dtype)
        local_rope = (global_rope if self.local_rotary_emb is self.rotary_emb
                      else self.local_rotary_emb.step_inputs(positions, hidden_states.dtype))
        layers = self.layers[self.start_layer : self.end_layer]
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            hidden_states = layer(hidden_states, global_rope, local_rope, kv_cache, attn_metadata)
        if not pp.is_last:
            pp.comm.send(hidden_states, pp.rank + 1)
            return hidden_states
        return self.norm(hidden_states)


class GemmaForCausalLM(nn.Module):
    """Gemma 2 / Gemma 3 (text) causal LM over a paged KV cache."""

    # Tensor parallelism: the Llama family's parallel layers over this rank's heads (norms and soft caps act within a
    # head or after the gathered logits); pipeline parallelism: stages of layers (GemmaModel).
    supports_parallel = True

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    stacked_params_mapping = LlamaForCausalLM.stacked_params_mapping

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.variant = GemmaVariant.of(config)
        # Gemma ties its embeddings unless config.json says otherwise (HF's default is True here).
        is_tied = bool(config.hf_config.get("tie_word_embeddings", True))
        self.model = GemmaModel(config, self.variant, attn_backend, quant_config, is_tied)
        tied_to = self.model.embed_tokens if is_tied else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied_to) if self.model.pp.is_last \
            else PPMissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [T, hidden_size] of every token in the step."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] in float32, soft-capped (``cap * tanh(logits / cap)``) when the model says so."""
        logits = self.lm_head(hidden_states)
        cap = self.variant.final_soft_cap
        return logits if cap <= 0 else torch.tanh(logits / cap) * cap
