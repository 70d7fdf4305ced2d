"""The Llama family: Llama 2/3, Mistral, Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on each head's q and k).

Tokens of all requests in a step are flattened into one dimension ([T, ...], no batch axis); attention over the
paged KV cache is delegated to the attention backend, which reads the step's ragged layout from the metadata.
Module names mirror HF's so checkpoint names map directly, except for the fused projections (``qkv_proj``,
``gate_up_proj``) which ``stacked_params_mapping`` resolves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.config import ModelConfig
from pagedllm.distributed.parallel_state import get_parallel_state, layer_range
from pagedllm.model.layers import (
    LMHead,
    PPMissingLayer,
    RMSNorm,
    RotaryEmbedding,
    RotaryStep,
    VocabEmbedding,
    attend_rotated,
    linear_norm_linear,
    rms_norm_linear,
    rotate_qk,
    silu_mul_linear,
)
from pagedllm.model.kv_scales import calibrate_kv_scales, kv_scale_parameter
from pagedllm.model.linear import Linear, MergedLinear, QKVLinear
from pagedllm.model.quantization.base import QuantizationConfig


@dataclass(frozen=True)
class LlamaVariant:
    """What tells the members of the family apart, read from config.json."""

    qkv_bias: bool  # bias on q/k/v (always in Qwen2; with attention_bias in Llama and Qwen3)
    o_bias: bool  # bias on the output projection (with attention_bias in Llama and Qwen3; HF Mistral has none)
    mlp_bias: bool
    qk_norm: bool  # RMSNorm on each head's q and k before rotary (Qwen3)

    @classmethod
    def of(cls, config: ModelConfig) -> LlamaVariant:
        hf, architecture = config.hf_config, config.architecture
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Unsupported hidden_act {hf['hidden_act']!r}; only 'silu' is implemented")
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            qkv_bias=architecture == "Qwen2ForCausalLM" or (attention_bias and architecture != "MistralForCausalLM"),
            o_bias=attention_bias and architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
        )


def sliding_window_of_layer(hf: dict[str, Any], architecture: str, layer_index: int) -> int:
    """The sliding window of layer ``layer_index`` as HF applies it (0 = global attention).

    ``layer_types`` (written by transformers 5) says per layer; else Qwen models window only with
    ``use_sliding_window``, and then only layers ``>= max_window_layers``; the others (Mistral, Mixtral, Phi-3)
    window every layer when ``sliding_window`` is set."""
    window = hf.get("sliding_window") or 0
    if not window:
        return 0
    layer_types = hf.get("layer_types")
    if layer_types:
        return window if layer_types[layer_index] == "sliding_attention" else 0
    if architecture.startswith("Qwen"):
        use_window = hf.get("use_sliding_window", False)
        return window if use_window and layer_index >= hf.get("max_window_layers", 0) else 0
    return window


def layer_index_of(prefix: str) -> int:
    """The decoder layer's index in a checkpoint prefix such as ``model.layers.3.self_attn``."""
    match = re.search(r"layers\.(\d+)(\.|$)", prefix)
    if match is None:
        raise ValueError(f"No layer index in module prefix {prefix!r}")
    return int(match.group(1))


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, optional per-head q/k norm, rotary, paged attention, output proj."""

    # Columns of the qkv output reordered before the split (None: as is): Phi-4-mini's partial rotary (phi3.py).
    qkv_permutation: torch.Tensor | None = None

    def __init__(self, config: ModelConfig, variant: LlamaVariant, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None, prefix: str, sliding_window: int | None = None) -> None:
        """``sliding_window``: the layer's window (0 = global); None reads it from the config for the layer index in
        ``prefix``, as HF does (``sliding_window_of_layer``)."""
        super().__init__()
        if sliding_window is None:
            sliding_window = sliding_window_of_layer(config.hf_config, config.architecture, layer_index_of(prefix))
        self.sliding_window = sliding_window
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        self.scale = self.head_dim**-0.5
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads,
                                  bias=variant.qkv_bias, quant_config=quant_config, prefix=prefix)
        # This rank's heads (all of them on one rank; see QKVLinear under tensor parallelism).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = Linear(num_heads * self.head_dim, config.hidden_size, bias=variant.o_bias,
                             quant_config=quant_config, prefix=f"{prefix}.o_proj", parallel="row")
        if variant.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn_backend = attn_backend
        # FP8 KV cache: what the cache holds is K / k_scale and V / v_scale (checkpoint names; see kv_scales.py).
        self.k_scale = kv_scale_parameter()
        self.v_scale = kv_scale_parameter()

    def forward(
        self,
        qkv: torch.Tensor,
        rope: RotaryStep,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Attention from the output of ``qkv_proj``, before ``o_proj`` ([T, heads x head_dim]): the decoder layer
        runs both projections, so the norm before ``qkv_proj`` and the one after ``o_proj`` can fuse into them."""
        num_tokens = qkv.shape[0]
        if self.qkv_permutation is not None:  # partial rotary as full-width rotary (phi3.py)
            qkv = qkv.index_select(-1, self.qkv_permutation)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        # Qwen3 normalizes each head before rotary; on CUDA, rotary and the store of k and v run inside the decode
        # kernel, or in rotary's launch for other steps (attend_rotated).
        if attn_metadata.compute_kv_scales:  # the scales come from the rotated k and v, before the backend stores them
            q, k = rotate_qk(q, k, rope, self.q_norm, self.k_norm)
            calibrate_kv_scales(k, v, self.k_scale, self.v_scale, kv_cache.dtype)
            out = self.attn_backend.forward(q, k, v, kv_cache, attn_metadata, self.scale, self.k_scale, self.v_scale,
                                            sliding_window=self.sliding_window)
        else:
            out = attend_rotated(self.attn_backend, q, k, v, rope, self.q_norm, self.k_norm, kv_cache, attn_metadata,
                                 self.scale, self.k_scale, self.v_scale, self.sliding_window,
                                 rotary_in_decode=self.qkv_proj.is_dense)  # measured slower after FP8 (layers.py)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` with gate and up fused into one GEMM."""

    def __init__(self, config: ModelConfig, variant: LlamaVariant, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=variant.mlp_bias,
                                         quant_config=quant_config, prefix=prefix,
                                         part_names=["gate_proj", "up_proj"])
        self.down_proj = Linear(size, config.hidden_size, bias=variant.mlp_bias, quant_config=quant_config,
                                prefix=f"{prefix}.down_proj", parallel="row")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate) * up)`` from the output of ``gate_up_proj``, which the decoder layer runs (so that its
        norm can fuse into it)."""
        return silu_mul_linear(self.down_proj, gate_up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual add is fused into the following RMSNorm, and each RMSNorm (and the
    MLP's activation) can run inside the projection after it (``layers.rms_norm_linear``, ``silu_mul_linear``), the
    post-attention one inside the o projection before it instead (``layers.linear_norm_linear``)."""

    def __init__(self, config: ModelConfig, variant: LlamaVariant, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, variant, attn_backend, quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, variant, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RotaryStep,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # First layer: residual is None, and the residual stream starts as the embeddings.
        qkv, residual = rms_norm_linear(self.input_layernorm, self.self_attn.qkv_proj, hidden_states, residual)
        attended = self.self_attn(qkv, rope, kv_cache, attn_metadata)
        gate_up, residual = linear_norm_linear(self.self_attn.o_proj, attended, residual,
                                               self.post_attention_layernorm, self.mlp.gate_up_proj)
        return self.mlp(gate_up), residual


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.*``).

    Under pipeline parallelism this stage holds decoder layers ``[start_layer, end_layer)`` (the others are
    ``PPMissingLayer``), the embedding on the first stage and the final norm on the last; a later stage starts
    from the hidden states and residual the stage before sent, and a stage before the last sends its own on."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.pp = get_parallel_state().pp
        self.hidden_size = config.hidden_size
        self.dtype = torch.get_default_dtype()  # the model's (the loader builds it under that default)
        self.start_layer, self.end_layer = layer_range(config.num_hidden_layers, self.pp.rank, self.pp.size)
        # A tied LM head on the last stage reads the embedding table too.
        has_embedding = self.pp.is_first or (config.tie_word_embeddings and self.pp.is_last)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size) if has_embedding \
            else PPMissingLayer()
        # One rotary table for all layers: cos/sin are gathered once per step, not once per layer.
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_model_len, config.rope_theta, config.rope_scaling
        )
        variant = LlamaVariant.of(config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, variant, attn_backend, quant_config, f"model.layers.{i}")
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.pp.is_last else PPMissingLayer()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """``kv_caches``: one per layer of this stage."""
        if self.pp.comm is not None:
            return self._forward_stage(input_ids, positions, kv_caches, attn_metadata)
        hidden_states = self.embed_tokens(input_ids)
        rope = self.rotary_emb.step_inputs(positions, hidden_states.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(hidden_states, residual, rope, kv_cache, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _forward_stage(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                       attn_metadata: AttentionMetadata) -> torch.Tensor:
        """One pipeline stage: its layers between a receive from the stage before and a send to the one after
        (the last stage returns the normed hidden states, the others what they sent)."""
        pp, dtype = self.pp, self.dtype
        if pp.is_first:
            hidden_states = self.embed_tokens(input_ids)
            residual = torch.zeros_like(hidden_states)  # the first layer adds it to the embeddings: exact
        else:
            shape = (input_ids.shape[0], self.hidden_size)
            hidden_states = pp.comm.recv(torch.empty(shape, dtype=dtype, device=input_ids.device), pp.rank - 1)
            residual = pp.comm.recv(torch.empty(shape, dtype=dtype, device=input_ids.device), pp.rank - 1)
        rope = self.rotary_emb.step_inputs(positions, hidden_states.dtype)
        layers = self.layers[self.start_layer : self.end_layer]
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            hidden_states, residual = layer(hidden_states, residual, rope, kv_cache, attn_metadata)
        if not pp.is_last:
            pp.comm.send(hidden_states, pp.rank + 1)
            pp.comm.send(residual, pp.rank + 1)
            return hidden_states
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over a paged KV cache (also serves Mistral, Qwen2 and Qwen3 checkpoints)."""

    # Tensor and pipeline parallelism are implemented by this class (a subclass declares its own support).
    supports_parallel = True

    # Fused module -> the HF modules stacked into it, in shard order.
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    # (fused param name part, checkpoint name part, shard id) for the loader.
    stacked_params_mapping = [
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    ]

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, attn_backend, quant_config)
        tied_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied_to) if self.model.pp.is_last \
            else PPMissingLayer()

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # one per layer
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden_size] of every token in the step."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] in float32 for the rows the caller selected (usually each request's last)."""
        return self.lm_head(hidden_states)
