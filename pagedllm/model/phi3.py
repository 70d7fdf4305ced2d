"""Phi-3 and Phi-4-mini (``Phi3ForCausalLM``): Llama blocks with the checkpoint's projections fused already, LongRoPE,
and (Phi-4-mini) partial rotary.

- ``qkv_proj`` and ``gate_up_proj`` are stored fused in the checkpoint: they load whole into the fused layers (no
  stacked-parameter rule; ``_FusedLinear`` takes a tensor without shard id as the whole projection).
- LongRoPE (``rope_scaling.type`` "longrope", or its older name "su"): inverse frequencies divided by
  ``short_factor`` or ``long_factor``, and cos/sin multiplied by the attention factor (given, or
  ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` with ``factor = max_position_embeddings /
  original_max_position_embeddings``). Which factors a token uses: HF picks them per forward call from the call's
  largest position (long once it reaches ``original_max_position_embeddings``); in ``generate`` that is: every
  prompt token by the prompt's length, then each new token by its own position. Here the choice is per position
  (long from ``original_max_position_embeddings`` on): the same as HF for prompts that fit in
  ``original_max_position_embeddings`` however far generation goes, independent of chunking, batching and
  preemption; a prompt longer than that gets short factors on its first ``original_max_position_embeddings``
  positions where HF uses long ones. (vLLM decides per batch: long for every token of a step when any position
  in the step is past the original length.)
- Partial rotary (``partial_rotary_factor``, Phi-4-mini 0.75): HF rotates the first ``R`` dims of each head
  (pairs ``i, i + R/2``) and passes the rest through. Reordering the q and k columns of each head to
  [rot first half, pass first half, rot second half, pass second half] makes that the full-width rotation of the
  Llama path with cos 1, sin 0 on the pass-through columns (q.k is unchanged by a permutation applied to both),
  so the fused CUDA rotary/KV-store kernel serves it as is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend
from pagedllm.config import ModelConfig
from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.model.layers import LMHead, PPMissingLayer, RotaryEmbedding
from pagedllm.model.linear import tp_attention_heads
from pagedllm.model.llama import LlamaForCausalLM, LlamaModel
from pagedllm.model.quantization.base import QuantizationConfig


def _rope_settings(config: ModelConfig) -> dict[str, Any]:
    """Rope parameters from either transformers 4 (top-level keys + ``rope_scaling``) or 5 (``rope_parameters``)."""
    hf = config.hf_config
    settings = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    settings.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    settings.setdefault("original_max_position_embeddings",
                        hf.get("original_max_position_embeddings") or config.max_position_embeddings)
    rope_type = settings.get("rope_type") or settings.get("type") or "default"
    settings["rope_type"] = "longrope" if rope_type == "su" else rope_type
    return settings


def rotary_dim(config: ModelConfig) -> int:
    """The number of dims of each head that rotary rotates."""
    return int(config.head_dim * float(_rope_settings(config)["partial_rotary_factor"]))


def longrope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_model_len, head_dim // 2] in float32: LongRoPE (or plain) rotary on the first
    ``rotary_dim // 2`` columns, identity (cos 1, sin 0) on the rest."""
    settings = _rope_settings(config)
    rope_type, rot = settings["rope_type"], rotary_dim(config)
    if rope_type not in ("default", "longrope"):
        raise ValueError(f"Unsupported rope type {rope_type!r} for Phi-3; supported: default, longrope (su)")
    theta = float(settings.get("rope_theta", config.rope_theta))
    exponents = torch.arange(0, rot, 2, dtype=torch.int64).float() / rot
    positions = torch.arange(config.max_model_len, dtype=torch.float32)
    if rope_type == "default":
        freqs = positions[:, None] * (1.0 / theta**exponents)[None, :]
        scaling = 1.0
    else:
        original = int(settings["original_max_position_embeddings"])
        short = 1.0 / (torch.tensor(settings["short_factor"], dtype=torch.float32) * theta**exponents)
        long = 1.0 / (torch.tensor(settings["long_factor"], dtype=torch.float32) * theta**exponents)
        inv_freq = torch.where((positions >= original)[:, None], long[None, :], short[None, :])
        freqs = positions[:, None] * inv_freq
        scaling = _attention_factor(settings, config.max_position_embeddings, original)
    cos = torch.ones(config.max_model_len, config.head_dim // 2)
    sin = torch.zeros(config.max_model_len, config.head_dim // 2)
    cos[:, : rot // 2] = freqs.cos() * scaling
    sin[:, : rot // 2] = freqs.sin() * scaling
    return cos, sin


def _attention_factor(settings: dict[str, Any], max_positions: int, original: int) -> float:
    """HF's LongRoPE attention factor: given, else from the context extension ratio."""
    if settings.get("attention_factor") is not None:
        return float(settings["attention_factor"])
    factor = settings.get("factor") or max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def qkv_permutation(config: ModelConfig, num_heads: int | None = None,
                    num_kv_heads: int | None = None) -> torch.Tensor | None:
    """Column order of the qkv output that turns partial rotary into full-width rotary (None when rotary is full).

    ``num_heads`` / ``num_kv_heads``: the heads of this rank's qkv output under tensor parallelism (default: the
    model's); the permutation only moves columns inside each head, so each rank's slice permutes on its own."""
    head_dim, rot = config.head_dim, rotary_dim(config)
    if rot == head_dim:
        return None
    if rot % 2 or (head_dim - rot) % 2:
        raise ValueError(f"Partial rotary needs even rotary and pass-through widths, got {rot} of {head_dim}")
    half_rot, half_pass = rot // 2, (head_dim - rot) // 2
    head = torch.cat([torch.arange(0, half_rot), torch.arange(rot, rot + half_pass),
                      torch.arange(half_rot, rot), torch.arange(rot + half_pass, head_dim)])
    num_heads = config.num_attention_heads if num_heads is None else num_heads
    num_kv_heads = config.num_key_value_heads if num_kv_heads is None else num_kv_heads
    num_rotated_heads = num_heads + num_kv_heads  # q and k; v stays as is
    rotated = torch.cat([head + i * head_dim for i in range(num_rotated_heads)])
    value = torch.arange(num_rotated_heads * head_dim, (num_rotated_heads + num_kv_heads) * head_dim)
    return torch.cat([rotated, value])


class Phi3RotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` over precomputed LongRoPE / partial-rotary tables (``longrope_tables``)."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.head_dim = config.head_dim
        with torch.device("cpu"):
            cos, sin = longrope_tables(config)
        self.register_buffer("cos_cache", cos.to(torch.get_default_device()), persistent=False)
        self.register_buffer("sin_cache", sin.to(torch.get_default_device()), persistent=False)


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 / Phi-4-mini over a paged KV cache: the Llama model with Phi-3's rotary and fused checkpoint names."""

    # Tensor parallelism: the fused checkpoint qkv / gate_up are cut into their parts and each part narrowed to this
    # rank's heads / columns by the fused layers' loader; pipeline parallelism is the Llama model's.
    supports_parallel = True

    packed_modules_mapping: dict[str, list[str]] = {}
    stacked_params_mapping: list[tuple[str, str, object]] = []  # qkv_proj / gate_up_proj load whole

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend,
                 quant_config: QuantizationConfig | None = None) -> None:
        if quant_config is not None:
            raise ValueError("Quantized Phi-3 checkpoints are not supported (their fused qkv/gate_up layers are "
                             "stored under names the quantization configs do not map)")
        nn.Module.__init__(self)
        self.config = config
        # The Llama model with a plain rotary table (it cannot build LongRoPE), replaced by Phi-3's below.
        self.model = LlamaModel(dataclasses.replace(config, rope_scaling=None), attn_backend, quant_config)
        self.model.rotary_emb = Phi3RotaryEmbedding(config)
        # Over this rank's heads (all of them without tensor parallelism); one tensor all layers share.
        num_heads, num_kv_heads, _ = tp_attention_heads(config.num_attention_heads, config.num_key_value_heads,
                                                        get_parallel_state().tp)
        permutation = qkv_permutation(config, num_heads, num_kv_heads)
        if permutation is not None:
            permutation = permutation.to(torch.get_default_device())  # built on the model's device
            for layer in self.model.layers:
                if not isinstance(layer, PPMissingLayer):  # (another pipeline stage's)
                    layer.self_attn.qkv_permutation = permutation
        tied_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied_to) if self.model.pp.is_last \
            else PPMissingLayer()
