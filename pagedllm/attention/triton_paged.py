"""Triton paged attention for CUDA: KV store, prefill over the paged cache, and split-K paged decode.

Three kernels, each one launch per layer for the whole step:

- ``_store_kv_kernel`` writes every new token's K and V at its slot (``slot_mapping``; a negative slot is a
  padding token, skipped, so CUDA-graph padding never touches the cache).
- ``_prefill_kernel`` serves any step (prefills, prefill chunks over a cached prefix, decodes mixed in): one
  program per (request, kv head, block of queries). The query heads that share a kv head are packed into the
  rows of one tile (row = query token * GROUP_PAD + head in group), so GQA reads each K/V tile once per group.
- ``_decode_kernel`` serves steps where every request decodes one token: one program per (request, kv head,
  split), each split attending to a contiguous slice of the context (flash-decoding), so a small batch with long
  contexts still fills the GPU; ``_reduce_splits_kernel`` then merges the splits by their log-sum-exp. The split
  count depends only on the batch size (and an upper bound of the context), never on the contexts' actual
  lengths, so a decode step can be captured in a CUDA graph and replayed with other lengths. Through
  ``decode_with_rotary`` it also rotates the query and the new key (after Qwen3's per-head RMSNorm): the split
  whose keys end at the new token stores the rotated k and v, then reads them back with the rest (a CTA barrier
  between), which saves the rotary kernel's launch.

Every kernel can launch with programmatic dependent launch (``pagedllm/pdl.py``, on by default on Hopper and
newer): it then waits for the kernel before it as its first step, and its launch overlaps that kernel's tail.

With an FP8 cache (``IS_FP8``; ``triton_fp8.py``) the store quantizes (``x / scale``, saturated, cast) and the
attention kernels read the FP8 tiles directly: K and V are converted to the query's dtype in registers (exact: every
FP8 value is a bf16/fp16/fp32 value), the K scale is folded into the query's scale and the V scale into the output,
which is the dequantization ``x * scale`` done once per row instead of once per element.

Per layer, a sliding window (``window`` > 0: the query at p sees keys p - window < k <= p) skips whole key tiles
outside the window (the loops start at the tile holding the first visible key; decode splits cover only the window)
and masks inside the edge tile; attention logit soft-capping (``cap * tanh(s / cap)``, Gemma 2) is applied to the
base-2 scores with the cap scaled the same way. Both are per-layer Python numbers: fixed under CUDA graphs.

Keys are read through the block table one token at a time (``block_table[pos // BLOCK_SIZE]``), so any
power-of-two block size works with any tile size. Softmax runs in float32 in base 2 (``exp2`` with the scale
folded into ``log2(e)``); the output is in the query's dtype. The pure-torch backend is the oracle these kernels
are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm import pdl
from pagedllm.attention.backend import AttentionMetadata, DecodeRotary
from pagedllm.attention.triton_fp8 import fp8_kernel_args, load_scale, quantize_fp8
from pagedllm.model.split_k import sm_count
from pagedllm.pdl import allow_later_kernels, wait_for_earlier_kernels

_LOG2_E = 1.4426950408889634
_PREFILL_BLOCK_M = 64  # query rows (tokens x heads of a group) per prefill program
_BLOCK_N = 64  # keys per inner-loop tile
_MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows
_MAX_SPLITS = 64
# A decode split attends to at least this many key tiles of the context bound: a split of one or two tiles pays its
# partial write and the merge launch for little work (1: as many splits as the bound has tiles, up to _MAX_SPLITS).
# At 4 the 256-token decode graphs of small batches run one split and no merge launch. H200, batch-1 decode step,
# same calls (benchmarks/h200/session30): Qwen3-0.6B 1.087 against 1.106 ms (two runs each, interleaved),
# Llama-3.1-8B 4.351 against 4.372, Qwen3-30B-A3B 3.192 against 3.214.
MIN_TILES_PER_SPLIT = 4


class TritonPagedAttention:
    """Paged attention on CUDA with Triton kernels (see the module docstring)."""

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
            store_kv(key, value, kv_cache, metadata.slot_mapping, k_scale, v_scale)
        output = torch.empty_like(query)
        if metadata.max_query_len == 1:
            paged_decode(query, kv_cache, metadata, scale, output, k_scale, v_scale, sliding_window, logits_soft_cap)
        else:
            paged_prefill(query, kv_cache, metadata, scale, output, k_scale, v_scale, sliding_window, logits_soft_cap)
        return output

    rotates_in_decode = True  # decode_with_rotary: see backend.DecodeRotary

    def decode_with_rotary(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim], not yet rotated; one token per request
        rotary: DecodeRotary,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        sliding_window: int = 0,
        logits_soft_cap: float = 0.0,
    ) -> torch.Tensor:
        """A decode step's attention with rotary (and Qwen3's q/k norm) applied inside the decode kernel, which
        also stores the rotated k and v: one launch where ``rotary_qk_store_kv`` then ``forward`` take two."""
        if metadata.max_query_len != 1:
            raise ValueError(f"decode_with_rotary serves decode steps only (max_query_len {metadata.max_query_len})")
        output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        paged_decode(query, kv_cache, metadata, scale, output, k_scale, v_scale, sliding_window, logits_soft_cap,
                     rotary)
        return output


def _flat_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """[2, num_blocks, block_size, H, D] -> [2, num_blocks * block_size, H, D] (a view: slots index dim 1)."""
    return kv_cache.view(2, -1, *kv_cache.shape[3:])


def _padded_head_dim(head_dim: int) -> int:
    """Tiles are powers of two of at least 16 columns (tl.dot's minimum); extra columns are masked out."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 models (parity tests) need exact float32 dots, not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write each token's K/V [num_tokens, num_kv_heads, head_dim] into its slot (quantized for an FP8 cache);
    slot < 0 = padding, skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    cache = _flat_cache(kv_cache)
    k_scale, v_scale, fp8 = fp8_kernel_args(kv_cache, k_scale, v_scale)
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, cache[0], cache[1], slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cache.stride(1), cache.stride(2),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_padded_head_dim(head_dim), **fp8, **pdl.launch_options(key.device),
    )


@triton.jit
def _store_kv_kernel(
    key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_slot, stride_cache_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_earlier_kernels(USE_PDL)
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:
        return
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    k = tl.load(key + token.to(tl.int64) * stride_kt + head * stride_kh + offs_d, mask=d_mask)
    v = tl.load(value + token.to(tl.int64) * stride_vt + head * stride_vh + offs_d, mask=d_mask)
    if IS_FP8:
        k = quantize_fp8(k, tl.load(k_scale), FP8_MAX)
        v = quantize_fp8(v, tl.load(v_scale), FP8_MAX)
    target = slot * stride_cache_slot + head * stride_cache_head + offs_d
    tl.store(key_cache + target, k.to(key_cache.dtype.element_ty), mask=d_mask)
    tl.store(value_cache + target, v.to(value_cache.dtype.element_ty), mask=d_mask)


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i,  # q [M, D] (pre-scaled by scale*log2 e); running output, max, sum per row
    key_cache, value_cache, block_table_row, start, seq_len, query_pos,  # query_pos [M]: causal limit per row
    kv_head, stride_cache_slot, stride_cache_head, window, soft_cap,  # soft_cap: the cap in base-2 units
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFT_CAP: tl.constexpr,
):
    """One online-softmax step over keys [start, start + BLOCK_N) of a request, read through its block table.
    With an FP8 cache, ``q`` carries the K scale and ``acc`` still lacks the V scale (the caller multiplies it)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    in_context = offs_n < seq_len
    block = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=in_context, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + offs_n % BLOCK_SIZE
    kv_offsets = slot[:, None] * stride_cache_slot + kv_head * stride_cache_head + offs_d[None, :]
    kv_mask = in_context[:, None] & (offs_d[None, :] < HEAD_DIM)
    # An FP8 cache's tiles become the query's dtype here, exactly; their scales are applied by the caller.
    k = tl.load(key_cache + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
    v = tl.load(value_cache + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N], base-2 logits
    if HAS_SOFT_CAP:
        scores = soft_cap * _tanh(scores / soft_cap)
    is_visible = in_context[None, :] & (offs_n[None, :] <= query_pos[:, None])
    if HAS_WINDOW:
        is_visible = is_visible & (offs_n[None, :] > query_pos[:, None] - window)
    scores = tl.where(is_visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # Rows that have seen no visible key yet keep m = -inf: subtract 0 instead so exp2 gives 0, not nan.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_keys(
    q, key_cache, value_cache, block_table_row, lo, end, seq_len, query_pos, kv_head, stride_cache_slot,
    stride_cache_head, window, soft_cap, v_scale,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_FP8: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFT_CAP: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Each query row's attention over keys [lo, end) of its request, tile by tile: the normalized output [M, D]
    (0 for a row that saw no visible key) and each row's running max and sum (for a split's log-sum-exp). With the
    late PDL trigger, the next kernel is placed once the keys are read."""
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(lo, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, key_cache, value_cache, block_table_row, start, seq_len, query_pos,
            kv_head, stride_cache_slot, stride_cache_head, window, soft_cap, BLOCK_SIZE, BLOCK_N, HEAD_DIM,
            HEAD_DIM_PAD, DOT_PRECISION, HAS_WINDOW, HAS_SOFT_CAP,
        )
    allow_later_kernels(USE_PDL)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if IS_FP8:
        out = out * tl.load(v_scale)
    return out, m_i, l_i


@triton.jit
def _tanh(x):
    """tanh from one exp of a non-positive argument: no overflow, and accurate near 0 (no 1 - 1 cancellation)."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


def _window_args(sliding_window: int, logits_soft_cap: float) -> tuple[tuple[int, float], dict[str, bool]]:
    """Kernel arguments of a layer's window and soft cap (the cap in the kernels' base-2 units)."""
    window = max(0, int(sliding_window or 0))
    cap = float(logits_soft_cap or 0.0)
    return (window, cap * _LOG2_E), {"HAS_WINDOW": window > 0, "HAS_SOFT_CAP": cap > 0}


# ---- prefill (any step) ---------------------------------------------------------------------------------------


def paged_prefill(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float, output: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    sliding_window: int = 0, logits_soft_cap: float = 0.0,
) -> None:
    """Causal attention of each request's queries over its cached prefix plus themselves."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(_PREFILL_BLOCK_M, group_pad)
    queries_per_program = block_m // group_pad
    cache = _flat_cache(kv_cache)
    grid = (metadata.num_reqs, num_kv_heads, triton.cdiv(metadata.max_query_len, queries_per_program))
    k_scale, v_scale, fp8 = fp8_kernel_args(kv_cache, k_scale, v_scale)
    window_args, window_flags = _window_args(sliding_window, logits_soft_cap)
    _prefill_kernel[grid](
        query, output, cache[0], cache[1], metadata.block_tables, metadata.query_start_loc, metadata.seq_lens,
        k_scale, v_scale, scale * _LOG2_E, *window_args,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        cache.stride(1), cache.stride(2), metadata.block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_padded_head_dim(head_dim), BLOCK_SIZE=kv_cache.shape[2], DOT_PRECISION=_dot_precision(query.dtype),
        IS_FP8=fp8["IS_FP8"], **window_flags, **pdl.launch_options(query.device),
    )


@triton.jit
def _prefill_kernel(
    query, output, key_cache, value_cache, block_tables, query_start_loc, seq_lens, k_scale, v_scale, qk_scale,
    window, soft_cap,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cache_slot, stride_cache_head, stride_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFT_CAP: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_earlier_kernels(USE_PDL)
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)
    QUERIES: tl.constexpr = BLOCK_M // GROUP_PAD
    q_start = tl.load(query_start_loc + req)
    q_len = tl.load(query_start_loc + req + 1) - q_start
    if q_block * QUERIES >= q_len:
        return
    seq_len = tl.load(seq_lens + req)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_index = q_block * QUERIES + rows // GROUP_PAD  # query token within the request
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (q_index < q_len) & (rows % GROUP_PAD < GROUP)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_offsets = (q_start + q_index)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(query + q_offsets, mask=mask, other=0.0)
    q = (q.to(tl.float32) * (qk_scale * load_scale(k_scale, IS_FP8))).to(query.dtype.element_ty)
    query_pos = context_len + q_index

    # Keys past the block's last query are invisible to all its rows: stop there.
    end = tl.minimum(seq_len, context_len + (q_block + 1) * QUERIES)
    # With a window, keys before the first query's window are invisible to all rows: start at their tile.
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(context_len + q_block * QUERIES - window + 1, 0) // BLOCK_N * BLOCK_N
    out, _, _ = _attend_keys(
        q, key_cache, value_cache, block_tables + req.to(tl.int64) * stride_table, lo, end, seq_len, query_pos,
        kv_head, stride_cache_slot, stride_cache_head, window, soft_cap, v_scale, BLOCK_M, BLOCK_SIZE, BLOCK_N,
        HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION, IS_FP8, HAS_WINDOW, HAS_SOFT_CAP, USE_PDL,
    )
    o_offsets = (q_start + q_index)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(output + o_offsets, out.to(output.dtype.element_ty), mask=mask)


# ---- decode (every request has one query) ----------------------------------------------------------------------


def num_decode_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per (request, kv head) so that the decode launch has a few programs per SM: 1 for big batches,
    many for a single long sequence; never more than the longest context has runs of ``MIN_TILES_PER_SPLIT`` key
    tiles."""
    wanted = triton.cdiv(4 * sm_count(device), num_reqs * num_kv_heads)
    return max(1, min(wanted, _MAX_SPLITS, triton.cdiv(max_seq_len, _BLOCK_N * MIN_TILES_PER_SPLIT)))


def paged_decode(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float, output: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    sliding_window: int = 0, logits_soft_cap: float = 0.0, rotary: DecodeRotary | None = None,
) -> None:
    """One query per request over its whole paged context, split along the context when the batch is small. With
    ``rotary``, ``query`` is not yet rotated: the kernel rotates it, and stores the rotated new k and v first."""
    num_reqs = metadata.num_reqs
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    block_m = max(_MIN_DOT_ROWS, triton.next_power_of_2(group))
    num_splits = num_decode_splits(num_reqs, num_kv_heads, metadata.max_seq_len, query.device)
    cache = _flat_cache(kv_cache)
    if num_splits == 1:  # write the output directly
        partial_out, partial_lse = output, output  # lse unused
        stride_po = (output.stride(0), output.stride(1), 0)
    else:
        partial_out = torch.empty(num_reqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        partial_lse = torch.empty(num_reqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        stride_po = partial_out.stride()[:3]
    k_scale, v_scale, fp8 = fp8_kernel_args(kv_cache, k_scale, v_scale)
    window_args, window_flags = _window_args(sliding_window, logits_soft_cap)
    _decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, partial_out, partial_lse, cache[0], cache[1], metadata.block_tables, metadata.seq_lens,
        k_scale, v_scale, scale * _LOG2_E, *window_args, num_splits,
        query.stride(0), query.stride(1), *stride_po,
        cache.stride(1), cache.stride(2), metadata.block_tables.stride(0),
        *_rotary_args(rotary, query, metadata.slot_mapping),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, HEAD_DIM=head_dim, HEAD_DIM_PAD=_padded_head_dim(head_dim),
        BLOCK_SIZE=kv_cache.shape[2],
        DOT_PRECISION=_dot_precision(query.dtype), IS_SPLIT=num_splits > 1, **fp8, **window_flags,
        ROTARY=rotary is not None, HAS_QK_NORM=rotary is not None and rotary.q_norm_weight is not None,
        **pdl.launch_options(query.device),
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_reqs, num_heads)](
            partial_out, partial_lse, output, num_splits,
            *partial_out.stride()[:3], output.stride(0), output.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=_padded_head_dim(head_dim), SPLITS_PAD=triton.next_power_of_2(num_splits),
            **pdl.launch_options(query.device),
        )


def _rotary_args(rotary: DecodeRotary | None, query: torch.Tensor, slot_mapping: torch.Tensor) -> tuple:
    """The decode kernel's rotary arguments: the new k and v, slots, positions, tables, norm weights, eps and
    strides; unread placeholders (``query``) without rotary."""
    if rotary is None:
        return (query,) * 8 + (0.0, 0, 0, 0, 0, 0)
    key, value = rotary.key, rotary.value
    head_dim = query.shape[2]
    if head_dim % 2 or key.shape[2] != head_dim or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"decode rotary needs an even head_dim and k, v [T, Hkv, {head_dim}] with contiguous last "
                         f"dims; got k {tuple(key.shape)} strides {key.stride()}, v strides {value.stride()}")
    if (rotary.q_norm_weight is None) != (rotary.k_norm_weight is None):
        raise ValueError("decode rotary needs both q_norm_weight and k_norm_weight, or neither")
    q_norm = query if rotary.q_norm_weight is None else rotary.q_norm_weight
    k_norm = query if rotary.k_norm_weight is None else rotary.k_norm_weight
    return (key, value, slot_mapping, rotary.positions, rotary.cos, rotary.sin, q_norm, k_norm, rotary.eps,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1), rotary.cos.stride(0))


@triton.jit
def _decode_kernel(
    query, partial_out, partial_lse, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale, qk_scale,
    window, soft_cap, num_splits,
    stride_qt, stride_qh, stride_po_req, stride_po_head, stride_po_split,
    stride_cache_slot, stride_cache_head, stride_table,
    new_key, new_value, slot_mapping, positions, cos_table, sin_table, q_norm_weight, k_norm_weight, eps,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_table_row,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_SPLIT: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFT_CAP: tl.constexpr,
    ROTARY: tl.constexpr, HAS_QK_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_earlier_kernels(USE_PDL)
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + req)
    # The keys to read start at the tile holding the first one in the window (0 without a window).
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0) // BLOCK_N * BLOCK_N
    # Tile-aligned slice of [lo, seq_len) for this split; trailing splits of a short context are empty.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - lo, BLOCK_N), num_splits)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)

    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_rows = query + req.to(tl.int64) * stride_qt
    if ROTARY:
        position = tl.load(positions + req).to(tl.int64)
        cos, sin = _rotary_columns(cos_table + position * stride_table_row, sin_table + position * stride_table_row,
                                   q_rows.dtype.element_ty, HEAD_DIM, HEAD_DIM_PAD)
        q = _rotated_heads(q_rows, head * stride_qh, row_valid, q_norm_weight, cos, sin, eps, HEAD_DIM, HEAD_DIM_PAD,
                           HAS_QK_NORM)
        # The split whose keys end at the new token stores its k and v, then reads them back with the rest.
        is_last_split = (start <= seq_len - 1) & (seq_len - 1 < end)
        _store_rotated_kv(new_key + req.to(tl.int64) * stride_kt + kv_head * stride_kh,
                          new_value + req.to(tl.int64) * stride_vt + kv_head * stride_vh,
                          tl.load(slot_mapping + req), is_last_split, key_cache, value_cache,
                          kv_head, stride_cache_slot, stride_cache_head, k_norm_weight, cos, sin, eps, k_scale,
                          v_scale, HEAD_DIM, HEAD_DIM_PAD, HAS_QK_NORM, IS_FP8, FP8_MAX)
        tl.debug_barrier()  # the CTA's stores are visible to all its threads' loads after this
    else:
        q = tl.load(q_rows + head[:, None] * stride_qh + offs_d[None, :], mask=mask, other=0.0)
    q = (q.to(tl.float32) * (qk_scale * load_scale(k_scale, IS_FP8))).to(query.dtype.element_ty)
    query_pos = tl.full([BLOCK_M], 0, dtype=tl.int32) + seq_len - 1

    # An empty split (or a padding request, seq_len 0) leaves l = 0: output 0, lse -inf (weight 0 in the merge).
    out, m_i, l_i = _attend_keys(
        q, key_cache, value_cache, block_tables + req.to(tl.int64) * stride_table, start, end, seq_len, query_pos,
        kv_head, stride_cache_slot, stride_cache_head, window, soft_cap, v_scale, BLOCK_M, BLOCK_SIZE, BLOCK_N,
        HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION, IS_FP8, HAS_WINDOW, HAS_SOFT_CAP, USE_PDL,
    )
    o_offsets = (req.to(tl.int64) * stride_po_req + head[:, None] * stride_po_head + split * stride_po_split
                 + offs_d[None, :])
    tl.store(partial_out + o_offsets, out.to(partial_out.dtype.element_ty), mask=mask)
    if IS_SPLIT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        lse_offsets = (req.to(tl.int64) * num_splits * tl.num_programs(1) * GROUP + head * num_splits + split)
        tl.store(partial_lse + lse_offsets, lse, mask=row_valid)


@triton.jit
def _rotary_columns(cos_row, sin_row, DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """A position's cos and sin for every column of a head (column d uses angle d mod D/2), rounded to the
    activation dtype as the torch path rounds its gathered rows."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    angle = offs_d % (HEAD_DIM // 2)
    in_head = offs_d < HEAD_DIM
    cos = tl.load(cos_row + angle, mask=in_head, other=0.0).to(DTYPE).to(tl.float32)
    sin = tl.load(sin_row + angle, mask=in_head, other=0.0).to(DTYPE).to(tl.float32)
    return cos, sin


@triton.jit
def _rotated_heads(x_ptr, row_offsets, row_valid, norm_weight, cos, sin, eps, HEAD_DIM: tl.constexpr,
                   HEAD_DIM_PAD: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rows ``x_ptr + row_offsets`` (one head each) rotated neox-style (``x * cos + rotate_half(x) * sin``), after
    the per-head RMSNorm with HAS_NORM; rounded where ``triton_ops._rotate_heads`` rounds, in x's dtype. Each
    column's partner in ``rotate_half`` (d + D/2, or d - D/2 in the second half) is loaded as a second tile."""
    dtype = x_ptr.dtype.element_ty
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    half = HEAD_DIM // 2
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
    mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(x_ptr + row_offsets[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(x_ptr + row_offsets[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        weight = tl.load(norm_weight + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
        partner_weight = tl.load(norm_weight + partner, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
        x = ((x * rstd).to(dtype).to(tl.float32) * weight[None, :]).to(dtype).to(tl.float32)
        x_partner = ((x_partner * rstd).to(dtype).to(tl.float32) * partner_weight[None, :]).to(dtype).to(tl.float32)
    sign = tl.where(offs_d < half, -1.0, 1.0)
    return (x * cos[None, :] + sign[None, :] * x_partner * sin[None, :]).to(dtype)


@triton.jit
def _store_rotated_kv(
    k_row, v_row, slot, is_storing, key_cache, value_cache, kv_head, stride_cache_slot, stride_cache_head,
    k_norm_weight, cos, sin, eps, k_scale, v_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_NORM: tl.constexpr, IS_FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """Rotate one token's k head and store it and its v head at ``slot`` (divided by the scales for an FP8 cache),
    where ``is_storing`` and the slot is not padding (negative)."""
    rows = tl.arange(0, 2)  # one row, in the smallest tile Triton lays out everywhere
    is_row = rows < 1
    k = _rotated_heads(k_row, rows * 0, is_row, k_norm_weight, cos, sin, eps, HEAD_DIM, HEAD_DIM_PAD, HAS_NORM)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    in_head = offs_d[None, :] < HEAD_DIM
    v = tl.load(v_row + rows[:, None] * 0 + offs_d[None, :], mask=is_row[:, None] & in_head, other=0.0)
    if IS_FP8:
        k = quantize_fp8(k, tl.load(k_scale), FP8_MAX)
        v = quantize_fp8(v, tl.load(v_scale), FP8_MAX)
    # The scalar condition as a row bound (a tensor of bools and a scalar bool make int32 in Triton's interpreter).
    store_mask = (rows[:, None] < tl.where(is_storing & (slot >= 0), 1, 0)) & in_head
    offsets = tl.maximum(slot, 0).to(tl.int64) * stride_cache_slot + kv_head * stride_cache_head + offs_d[None, :]
    tl.store(key_cache + offsets + rows[:, None] * 0, k.to(key_cache.dtype.element_ty), mask=store_mask)
    tl.store(value_cache + offsets + rows[:, None] * 0, v.to(value_cache.dtype.element_ty), mask=store_mask)


@triton.jit
def _reduce_splits_kernel(
    partial_out, partial_lse, output, num_splits,
    stride_po_req, stride_po_head, stride_po_split, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Merge a (request, head)'s split outputs, each weighted by its share exp2(lse_s - lse) of the softmax."""
    wait_for_earlier_kernels(USE_PDL)
    req = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    is_split = offs_s < num_splits
    lse = tl.load(partial_lse + (req * num_heads + head) * num_splits + offs_s, mask=is_split, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no key at all (padding request): output 0
    weights = tl.exp2(lse - lse_max)
    total = tl.sum(weights, axis=0)
    offsets = (req.to(tl.int64) * stride_po_req + head * stride_po_head + offs_s[:, None] * stride_po_split
               + offs_d[None, :])
    parts = tl.load(partial_out + offsets, mask=is_split[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(output + req.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(output.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
