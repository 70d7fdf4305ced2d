"""Shared test helpers: tiny random HF models written to disk, KV caches and attention metadata for hand-driven
steps, and a small paged runner that feeds token chunks of several requests through a model."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from pagedllm.attention.backend import AttentionMetadata

# Real test assets (see ../shared/assets/README.md); tests that need them skip when the folder is absent.
ASSETS = Path(os.environ.get("PAGEDLLM_ASSETS") or Path(__file__).resolve().parents[2] / "shared" / "assets")
STORIES = ASSETS / "models" / "stories260K"

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 and theta 1e4, wavelengths span ~6..2e4: some below 64/4, some above 64, some between.
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
# variant -> (transformers config class name, overrides of _BASE)
TINY_MODEL_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", {"rope_parameters": _LLAMA3_ROPE}),
    "llama_linear_rope": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                             "rope_theta": 10000.0}}),
    "mistral": ("MistralConfig", {"head_dim": 16, "sliding_window": 4096}),
    # Sliding windows shorter than the prompts: every layer (Mistral), layers >= max_window_layers (Qwen2).
    "mistral_window": ("MistralConfig", {"head_dim": 16, "sliding_window": 8}),
    "qwen2_window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    # Phi-3: LongRoPE with an original length (32) that prompts fit in and prompts + outputs pass; Phi-4-mini's partial
    # rotary (half of each head) and tied embeddings on top.
    "phi3_longrope": ("Phi3Config", {"original_max_position_embeddings": 32, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 14.0, 20.0]}}),
    "phi4_mini": ("Phi3Config", {"original_max_position_embeddings": 32, "tie_word_embeddings": True,
                                 "partial_rotary_factor": 0.5, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 3.0, 7.0, 15.0]}}),
    # Gemma: windowed layers (8 tokens, shorter than the prompts) alternating with global ones.
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
                                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 10.0,
                                "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                    "num_hidden_layers": 3, "sliding_window_pattern": 2, "tie_word_embeddings": True,
                                    "rope_parameters": {
                                        "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 100000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # head_dim != hidden_size / num_heads (16)
    "qwen3_tied": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True}),
    # MoE: 8 experts, top-2; Qwen3-MoE with its second layer dense (mlp_only_layers).
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "norm_topk_prob": True, "mlp_only_layers": [1]}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 48}),
}


def build_tiny_model(tmp_path: str | Path, arch: str, max_shard_size: str | int | None = None, seed: int = 0,
                     **overrides: Any) -> str:
    """Write a tiny random HF model of variant ``arch`` (see TINY_MODEL_VARIANTS) in float32; return its directory.

    Weights are re-drawn at realistic scales (unit-variance activations, non-trivial attention, norm weights away
    from 1, non-zero biases) so that a wrong rotary, mask or norm shows up far above float32 rounding.
    ``max_shard_size`` (e.g. "20KB") writes sharded safetensors with an index; ``overrides`` go to the config.
    """
    import transformers

    config_class_name, variant_overrides = TINY_MODEL_VARIANTS[arch]
    config_class = getattr(transformers, config_class_name)
    config = config_class(**{**_BASE, **variant_overrides, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    out = Path(tmp_path) / (arch if max_shard_size is None else f"{arch}-sharded")
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return str(out)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        elif name.endswith("bias"):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        elif "embed_tokens" in name:
            param.copy_(torch.randn(param.shape, generator=generator))
        else:  # [(experts,) out, in] projections: std 1/sqrt(in) keeps activations near unit scale
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)


def load_hf_model(model_dir: str) -> torch.nn.Module:
    """The HF transformers reference for a model directory, float32, eager attention, eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def make_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] cache per layer, filled with NaN so that reading a
    slot nobody wrote poisons the output instead of passing silently."""
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(num_layers)]


def make_metadata(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
                  device: str = "cpu") -> AttentionMetadata:
    """Metadata of one step where request ``i`` computes its last ``query_lens[i]`` of ``seq_lens[i]`` tokens."""
    slots = []
    for query_len, seq_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
        for pos in range(seq_len - query_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for query_len in query_lens:
        starts.append(starts[-1] + query_len)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


class PagedRunner:
    """Drives a pagedllm model by hand: owns the KV caches, hands out blocks from a shuffled free list (so block
    tables have holes and are out of order), and runs steps of (request id, new token ids) chunks."""

    def __init__(self, model: torch.nn.Module, block_size: int = 4, num_blocks: int = 64, seed: int = 0,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        """``kv_cache_dtype``: the caches' dtype (an FP8 one, say); default the model's."""
        config = model.config
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        self.kv_caches = make_kv_caches(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                                        config.head_dim, kv_cache_dtype or param.dtype, str(param.device))
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.num_tokens: dict[str, int] = {}

    @torch.no_grad()
    def step(self, chunks: list[tuple[str, list[int]]]) -> torch.Tensor:
        """Compute the given new tokens of each request in one step; return logits [num_new_tokens, vocab]."""
        input_ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for req_id, token_ids in chunks:
            start = self.num_tokens.get(req_id, 0)
            end = start + len(token_ids)
            table = self.block_tables.setdefault(req_id, [])
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            self.num_tokens[req_id] = end
            input_ids += token_ids
            positions += range(start, end)
            query_lens.append(len(token_ids))
            seq_lens.append(end)
            tables.append(list(table))
        device = next(self.model.parameters()).device
        metadata = make_metadata(query_lens, seq_lens, tables, self.block_size, str(device))
        hidden = self.model(torch.tensor(input_ids, device=device), torch.tensor(positions, device=device),
                            self.kv_caches, metadata)
        return self.model.compute_logits(hidden)


def metric(llm, name: str) -> float:
    """The value of ``pagedllm:<name>`` in ``llm.get_metrics()``."""
    return next(m.value for m in llm.get_metrics() if m.name == "pagedllm:" + name)
