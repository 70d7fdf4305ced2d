"""Pure-torch paged attention: the CPU path, and the oracle every faster backend is tested against.

Readability beats speed here. The cache write is vectorized (one ``index_copy_`` per K and V). Prefill chunks are
attended one request at a time (``causal_attention``, the reference); decodes, one query per request, are
attended all at once over their gathered, padded contexts (``decode_attention``), so a big decode batch is a few
large ops rather than hundreds of small ones. Both materialize the scores: fine on CPU and as a reference, not a
fast GPU kernel. An FP8 cache (``kv_quant.py``) is quantized on the store and dequantized to the query's dtype as
it is gathered, before any arithmetic.

Per layer, a sliding window (``sliding_window`` > 0: the query at position p sees keys p - window < k <= p, as HF's
``sliding_window_overlay``) and attention logit soft-capping (``logits_soft_cap`` > 0: ``cap * tanh(s / cap)`` on
the scaled scores before the mask, as HF Gemma 2) are applied to the materialized scores.
"""

from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.kv_quant import as_bytes, dequantize_kv, quantize_kv


class TorchPagedAttention:
    """Writes the step's K/V into the paged cache, then runs causal attention per request through its block table."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]; None: already stored by the caller
        value: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,  # FP8 cache: the layer's K and V scales (None = 1.0)
        v_scale: torch.Tensor | None = None,
        sliding_window: int = 0,  # > 0: each query sees only the last ``sliding_window`` positions (itself included)
        logits_soft_cap: float = 0.0,  # > 0: scores become cap * tanh(scores / cap) (Gemma 2)
    ) -> torch.Tensor:
        if key is not None and value is not None:
            write_kv_cache(key, value, kv_cache, metadata.slot_mapping, k_scale, v_scale)
        block_size = kv_cache.shape[2]
        # Rows past the batch's real tokens (padding) stay zero rather than holding garbage.
        output = torch.zeros_like(query)
        decode_rows, decode_tokens = [], []
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(metadata.query_lens_cpu, metadata.seq_lens_cpu)):
            if query_len == 1:
                decode_rows.append(i)
                decode_tokens.append(start)
            else:
                num_blocks = -(-seq_len // block_size)
                block_ids = metadata.block_tables[i, :num_blocks].long()
                key_ctx, value_ctx = gather_context(kv_cache, block_ids, seq_len)
                output[start : start + query_len] = causal_attention(
                    query[start : start + query_len],
                    dequantize_kv(key_ctx, k_scale, query.dtype),
                    dequantize_kv(value_ctx, v_scale, query.dtype),
                    scale,
                    sliding_window,
                    logits_soft_cap,
                )
            start += query_len
        if decode_rows:
            self._decode(query, kv_cache, metadata, scale, output, decode_rows, decode_tokens, (k_scale, v_scale),
                         sliding_window, logits_soft_cap)
        return output

    @staticmethod
    def _decode(query, kv_cache, metadata, scale, output, rows: list[int], tokens: list[int], kv_scales,
                sliding_window: int, logits_soft_cap: float) -> None:
        """Attend every decode at once, in chunks that bound the gathered context's memory."""
        seq_lens = [metadata.seq_lens_cpu[i] for i in rows]
        chunk = max(1, _MAX_GATHERED_TOKENS // max(seq_lens))
        device = query.device
        for first in range(0, len(rows), chunk):
            row_ids = torch.tensor(rows[first : first + chunk], device=device)
            token_ids = torch.tensor(tokens[first : first + chunk], device=device)
            output[token_ids] = decode_attention(
                query[token_ids],
                kv_cache,
                metadata.block_tables[row_ids],
                metadata.seq_lens[row_ids],
                max(seq_lens[first : first + chunk]),
                scale,
                *kv_scales,
                sliding_window=sliding_window,
                logits_soft_cap=logits_soft_cap,
            )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store each token's K/V at its flat slot ``block_id * block_size + offset`` (one vectorized copy each),
    quantized for an FP8 cache."""
    num_tokens = slot_mapping.shape[0]
    # [2, num_blocks, block_size, H, D] -> [2, num_blocks * block_size, H, D]: a view, so the copy lands in the cache.
    flat = as_bytes(kv_cache.view(2, -1, *kv_cache.shape[3:]))
    flat[0].index_copy_(0, slot_mapping, as_bytes(quantize_kv(key[:num_tokens], k_scale, kv_cache.dtype)))
    flat[1].index_copy_(0, slot_mapping, as_bytes(quantize_kv(value[:num_tokens], v_scale, kv_cache.dtype)))


def gather_context(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's first ``seq_len`` keys and values, contiguous: [seq_len, num_kv_heads, head_dim] each."""
    num_kv_heads, head_dim = kv_cache.shape[3:]
    key = kv_cache[0, block_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    value = kv_cache[1, block_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return key, value


_MAX_GATHERED_TOKENS = 1 << 18  # context tokens gathered at once by decode_attention


def decode_attention(
    query: torch.Tensor,  # [R, num_heads, head_dim]: one query per request, at the end of its context
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [R, >= ceil(max_seq_len / block_size)]
    seq_lens: torch.Tensor,  # [R]
    max_seq_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,  # FP8 cache: the layer's K and V scales (None = 1.0)
    v_scale: torch.Tensor | None = None,
    sliding_window: int = 0,
    logits_soft_cap: float = 0.0,
) -> torch.Tensor:
    """One query per request over its whole paged context, for all requests at once (contexts padded to the
    longest; padding masked out). Scores and softmax in float32; returns the query's dtype."""
    num_reqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_blocks = -(-max_seq_len // block_size)
    tables = block_tables[:, :num_blocks].long()
    # [R, blocks, block_size, Hkv, D] -> [R, Hkv, L, D]
    key = dequantize_kv(kv_cache[0][tables], k_scale, query.dtype)
    value = dequantize_kv(kv_cache[1][tables], v_scale, query.dtype)
    key = key.reshape(num_reqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    value = value.reshape(num_reqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    # GQA without copying K/V: query head h = kv_head * group + g, as HF's repeat_kv groups them.
    grouped = query.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = soft_cap(torch.matmul(grouped, key.transpose(2, 3)).float() * scale, logits_soft_cap)  # [R, Hkv, g, L]
    key_pos = torch.arange(key.shape[2], device=query.device)[None, :]
    is_padding = key_pos >= seq_lens[:, None].long()
    if sliding_window > 0:  # the query sits at seq_len - 1
        is_padding |= key_pos <= seq_lens[:, None].long() - 1 - sliding_window
    scores.masked_fill_(is_padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Padding slots may hold anything, NaN included, and 0 * NaN is NaN: zero them rather than trust the mask.
    value = value.masked_fill(is_padding[:, None, :, None], 0.0)
    return torch.matmul(probs.to(value.dtype), value).reshape(num_reqs, num_heads, head_dim)


def soft_cap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(scores / cap)`` (attention logit soft-capping); the scores unchanged when ``cap`` is 0."""
    return scores if cap <= 0 else torch.tanh(scores / cap) * cap


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     sliding_window: int = 0, logits_soft_cap: float = 0.0) -> torch.Tensor:
    """Attention of ``query`` [q, H, D] over ``key``/``value`` [k, H_kv, D], the queries being the last q positions.

    Query ``j`` sits at context position ``k - q + j`` and sees positions ``<= k - q + j`` (and, with a sliding
    window ``w`` > 0, ``> k - q + j - w``). Computed in float32
    whatever the input dtype; returned in the query's dtype.
    """
    num_queries, num_heads, _ = query.shape
    num_keys, num_kv_heads, _ = key.shape
    # GQA: query head h reads kv head h // group, the same grouping as HF's repeat_kv.
    group = num_heads // num_kv_heads
    key = key.float().repeat_interleave(group, dim=1)
    value = value.float().repeat_interleave(group, dim=1)
    scores = soft_cap(torch.einsum("qhd,khd->hqk", query.float(), key) * scale, logits_soft_cap)
    query_pos = torch.arange(num_queries, device=query.device) + (num_keys - num_queries)
    key_pos = torch.arange(num_keys, device=query.device)
    is_visible = key_pos[None, :] <= query_pos[:, None]  # [q, k]
    if sliding_window > 0:
        is_visible &= key_pos[None, :] > query_pos[:, None] - sliding_window
    scores = scores.masked_fill(~is_visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, value).to(query.dtype)
