"""Pure-torch paged attention: the CPU path, and the oracle every faster backend is tested against.

Readability beats speed here. The cache write is vectorized (one ``index_copy_`` per K and V), but attention loops
over the requests of the batch in Python and materializes each request's scores, which is fine on CPU and as a
reference, and far too slow for serving on a GPU.
"""

from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionMetadata


class TorchPagedAttention:
    """Writes the step's K/V into the paged cache, then runs causal attention per request through its block table."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        block_size = kv_cache.shape[2]
        # Rows past the batch's real tokens (padding) stay zero rather than holding garbage.
        output = torch.zeros_like(query)
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(metadata.query_lens_cpu, metadata.seq_lens_cpu)):
            num_blocks = -(-seq_len // block_size)
            block_ids = metadata.block_tables[i, :num_blocks].long()
            key_ctx, value_ctx = gather_context(kv_cache, block_ids, seq_len)
            end = start + query_len
            output[start:end] = causal_attention(query[start:end], key_ctx, value_ctx, scale)
            start = end
        return output


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store each token's K/V at its flat slot ``block_id * block_size + offset`` (one vectorized copy each)."""
    num_tokens = slot_mapping.shape[0]
    # [2, num_blocks, block_size, H, D] -> [2, num_blocks * block_size, H, D]: a view, so the copy lands in the cache.
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, key[:num_tokens].to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value[:num_tokens].to(kv_cache.dtype))


def gather_context(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's first ``seq_len`` keys and values, contiguous: [seq_len, num_kv_heads, head_dim] each."""
    num_kv_heads, head_dim = kv_cache.shape[3:]
    key = kv_cache[0, block_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    value = kv_cache[1, block_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return key, value


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``query`` [q, H, D] over ``key``/``value`` [k, H_kv, D], the queries being the last q positions.

    Query ``j`` sits at context position ``k - q + j`` and sees positions ``<= k - q + j``. Computed in float32
    whatever the input dtype; returned in the query's dtype.
    """
    num_queries, num_heads, _ = query.shape
    num_keys, num_kv_heads, _ = key.shape
    # GQA: query head h reads kv head h // group, the same grouping as HF's repeat_kv.
    group = num_heads // num_kv_heads
    key = key.float().repeat_interleave(group, dim=1)
    value = value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), key) * scale
    query_pos = torch.arange(num_queries, device=query.device) + (num_keys - num_queries)
    key_pos = torch.arange(num_keys, device=query.device)
    is_visible = key_pos[None, :] <= query_pos[:, None]  # [q, k]
    scores = scores.masked_fill(~is_visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, value).to(query.dtype)
