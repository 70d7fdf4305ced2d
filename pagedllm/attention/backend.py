"""The attention backend interface, shared by every implementation, and a lazy registry.

A step's batch is *ragged*: request ``i`` contributes ``query_lens[i]`` new tokens (a prefill chunk, or 1 for a
decode) laid out contiguously in the flat token dimension, in request order. Each new token's K/V is written into
the paged cache at its slot (``block_id * block_size + offset``); each request's queries then attend causally to
the request's whole context (cached prefix + the new tokens), read through its block table.

KV cache layout, one tensor per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (index 0 = K, 1 = V).
Its dtype is the model's, or an FP8 format holding ``x / scale`` with a per-layer K and V scale (``kv_quant.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Everything an attention backend needs to know about one step's ragged batch.

    Device tensors are on the model's device; ``*_cpu`` lists mirror them on the host so a backend that loops
    over requests (the torch reference) never has to sync to read them.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32: cumulative query lengths (starts at 0)
    seq_lens: torch.Tensor  # [num_reqs] int32: context length of each request *after* this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int32, padded with 0
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # calculate_kv_scales: this (eager) step sets each layer's K/V scales from its keys and values before storing.
    compute_kv_scales: bool = False

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass(frozen=True, slots=True)
class DecodeRotary:
    """What a backend needs to rotate the step's q and k itself in a decode step (``rotates_in_decode``): the
    un-rotated k and v of each token, and the fused rotary path's inputs (``layers.RotaryStep`` with the whole
    float32 tables, and Qwen3's per-head q/k RMSNorm weights or None). The backend then stores the rotated k and v
    at ``metadata.slot_mapping`` and attends in one launch, instead of a rotary launch that stores and then reads."""

    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim], not yet rotated
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor  # [num_tokens]
    cos: torch.Tensor  # [max_position, head_dim // 2] float32
    sin: torch.Tensor
    q_norm_weight: torch.Tensor | None  # [head_dim], with k_norm_weight, or both None
    k_norm_weight: torch.Tensor | None
    eps: float


class AttentionBackend(Protocol):
    """Stores the step's new K/V into the paged cache and computes attention for the step's queries.

    ``key`` and ``value`` are None when the caller has already written them into ``kv_cache`` at
    ``metadata.slot_mapping`` (on CUDA the rotary kernel does, in the same launch: ``model/triton_ops.py``).

    ``sliding_window`` and ``logits_soft_cap`` are per layer (Gemma alternates windowed and global layers): plain
    Python numbers fixed for the layer, so a captured CUDA graph bakes them in and nothing syncs.
    """

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim], or None: already in the cache
        value: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim], or None with key
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,  # FP8 cache: 0-dim float32 K and V scales of the layer (None = 1.0)
        v_scale: torch.Tensor | None = None,
        sliding_window: int = 0,  # the layer's window: > 0 = a query at p sees keys (p - window, p]; 0 = global
        logits_soft_cap: float = 0.0,  # > 0: scaled scores become cap * tanh(scores / cap) (Gemma 2); 0 = off
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


# name -> "module:Class"; modules are imported only when chosen, so CUDA-only code never loads on CPU.
_BACKENDS = {
    "torch": "pagedllm.attention.torch_paged:TorchPagedAttention",
    "triton": "pagedllm.attention.triton_paged:TritonPagedAttention",
}


def get_attention_backend(name: str) -> AttentionBackend:
    """Instantiate the attention backend registered under ``name``."""
    if name not in _BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    module_name, class_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
