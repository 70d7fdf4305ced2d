"""Triton kernels of the LoRA delta, in the Punica / S-LoRA style (BGMV: each token reads its own slot's weights).

``shrink``: ``u[t] = A[slot_t] x[t]`` -> [T, num_shards * r_max] in float32, all shards of a fused layer in one
launch. ``expand``: ``y[t, shard rows] += B[slot_t, shard rows] u[t, shard's rank block]``, one launch over every
shard (the grid's third axis). A token whose slot is -1 (the base model) costs one load and nothing else.

Both read the slot of each token from a device tensor, so a CUDA graph captured once replays with each step's
mapping. CUDA only (or Triton's interpreter on CPU, for the tests); imported lazily by ``layers.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, u_ptr, K, R, k_per_split, stride_xt, stride_as, stride_ar, stride_us,
                   stride_ut, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        k_begin = split * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        for k_start in range(k_begin, k_end, BLOCK_K):
            cols = k_start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token * stride_xt + cols, mask=cols < k_end, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_as + rows[:, None] * stride_ar + cols[None, :],
                        mask=(rows[:, None] < R) & (cols[None, :] < k_end), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(u_ptr + split * stride_us + token * stride_ut + rows, acc, mask=rows < R)


@triton.jit
def _expand_kernel(u_ptr, b_ptr, slots_ptr, y_ptr, offsets_ptr, sizes_ptr, num_splits, stride_us, stride_ut,
                   stride_bs, stride_bn, stride_yt, R_MAX: tl.constexpr, BLOCK_N: tl.constexpr):
    token = tl.program_id(0)
    shard = tl.program_id(2)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        size = tl.load(sizes_ptr + shard)
        rows = tl.load(offsets_ptr + shard) + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N) < size
        ranks = tl.arange(0, R_MAX)
        u = tl.zeros((R_MAX,), dtype=tl.float32)
        for split in range(0, num_splits):  # the shrink's partial sums over K, in a fixed order (deterministic)
            u += tl.load(u_ptr + split * stride_us + token * stride_ut + shard * R_MAX + ranks)
        b = tl.load(b_ptr + slot * stride_bs + rows[:, None] * stride_bn + ranks[None, :], mask=mask[:, None],
                    other=0.0).to(tl.float32)
        delta = tl.sum(b * u[None, :], axis=1)
        y_rows = y_ptr + token * stride_yt + rows
        y = tl.load(y_rows, mask=mask).to(tl.float32)
        tl.store(y_rows, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


_SHRINK_BLOCK_K = 128
# A small batch gives the shrink few programs (one per token and rank block), each streaming a whole A slot: K is
# split until about this many programs run, each writing a partial sum that the expand adds up.
_SHRINK_TARGET_PROGRAMS = 256


def shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """``u[s, t] = A[slot_t] x[t]`` over split s of K, for x [T, K], A [slots, R, K]: [splits, T, R] float32 partial
    sums (rows of slot -1 unwritten)."""
    num_tokens, k = x.shape
    r = a.shape[1]
    block_r = min(triton.next_power_of_2(r), 64)
    num_r_blocks = triton.cdiv(r, block_r)
    wanted = max(1, min(_SHRINK_TARGET_PROGRAMS // (num_tokens * num_r_blocks), k // (2 * _SHRINK_BLOCK_K)))
    k_per_split = triton.cdiv(triton.cdiv(k, wanted), _SHRINK_BLOCK_K) * _SHRINK_BLOCK_K
    num_splits = triton.cdiv(k, k_per_split)
    u = torch.empty(num_splits, num_tokens, r, dtype=torch.float32, device=x.device)
    grid = (num_tokens, num_r_blocks, num_splits)
    _shrink_kernel[grid](x, a, token_slots, u, k, r, k_per_split, x.stride(0), a.stride(0), a.stride(1), u.stride(0),
                         u.stride(1), BLOCK_R=block_r, BLOCK_K=_SHRINK_BLOCK_K)
    return u


def expand(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
           shard_offsets: torch.Tensor, shard_sizes: torch.Tensor, max_rank: int, max_shard_size: int) -> None:
    """``y[t, shard] += B[slot_t, shard] u[t, shard's ranks]`` in place (u: the shrink's [splits, T, R] partial
    sums), for every shard in one launch."""
    block_n = 64
    grid = (y.shape[0], triton.cdiv(max_shard_size, block_n), shard_offsets.shape[0])
    _expand_kernel[grid](u, b, token_slots, y, shard_offsets, shard_sizes, u.shape[0], u.stride(0), u.stride(1),
                         b.stride(0), b.stride(1), y.stride(0), R_MAX=max_rank, BLOCK_N=block_n)


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
             shard_offsets: torch.Tensor, shard_sizes: torch.Tensor, max_rank: int, max_shard_size: int) -> None:
    """The whole delta of one layer: shrink, then expand into y (rows of ``x`` and ``y`` contiguous)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    u = shrink(x, a, token_slots)
    expand(y, u, b, token_slots, shard_offsets, shard_sizes, max_rank, max_shard_size)


# ---- SGMV: tiles of tokens sorted by adapter, for large steps ---------------------------------------------------
# A long prefill would make the per-token kernels above read each token's A and B again; here the tokens of a step
# are sorted by slot (on the host, ``segment_tiles``) and cut into tiles of BLOCK_M tokens of one slot, and each tile
# is a small GEMM on the tensor cores: A and B are read once per tile instead of once per token.

SGMV_BLOCK_M = 32


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, perm_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, u_ptr, K, R,
                        stride_xt, stride_as, stride_ar, stride_ut, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(tile_end_ptr + tile)
    tokens = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        cols = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < K),
                    other=0.0)
        a = tl.load(a_ptr + slot * stride_as + ranks[None, :] * stride_ar + cols[:, None],
                    mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    tl.store(u_ptr + tokens[:, None] * stride_ut + ranks[None, :], acc, mask=row_mask[:, None] & (ranks[None, :] < R))


@triton.jit
def _sgmv_expand_kernel(u_ptr, b_ptr, perm_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, y_ptr, offsets_ptr,
                        sizes_ptr, stride_ut, stride_bs, stride_bn, stride_yt, R_MAX: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    shard = tl.program_id(2)
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(tile_end_ptr + tile)
    tokens = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < tl.load(sizes_ptr + shard)
    cols = tl.load(offsets_ptr + shard) + n
    ranks = tl.arange(0, R_MAX)
    u = tl.load(u_ptr + tokens[:, None] * stride_ut + shard * R_MAX + ranks[None, :], mask=row_mask[:, None],
                other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + ranks[:, None], mask=n_mask[None, :],
                other=0.0).to(tl.float32)
    delta = tl.dot(u, b, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + cols[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


def segment_tiles(token_slots, block_m: int = SGMV_BLOCK_M):
    """Host side (numpy): the permutation sorting a step's tokens by slot (tokens of slot -1 left out), and the tiles
    over it as rows [3, num_tiles]: slot, start, end of at most ``block_m`` sorted positions of one slot each."""
    import numpy as np

    order = np.argsort(token_slots, kind="stable")
    sorted_slots = token_slots[order]
    first = int(np.searchsorted(sorted_slots, 0))  # the base model's tokens sort first
    perm, sorted_slots = order[first:], sorted_slots[first:]
    bounds = np.flatnonzero(np.diff(sorted_slots)) + 1
    starts, ends = np.concatenate(([0], bounds)), np.concatenate((bounds, [len(perm)]))
    tiles = [(int(sorted_slots[s]), t, min(t + block_m, e)) for s, e in zip(starts, ends) for t in range(s, e, block_m)]
    return perm.astype(np.int32), np.ascontiguousarray(np.array(tiles, dtype=np.int32).reshape(-1, 3).T)


def add_lora_segmented(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor,
                       tiles: torch.Tensor, shard_offsets: torch.Tensor, shard_sizes: torch.Tensor, max_rank: int,
                       max_shard_size: int) -> None:
    """The delta of one layer over sorted tiles (``segment_tiles``, on the device: perm [n], tiles [3, num_tiles]);
    needs ``max_rank >= 16`` (the tensor cores' smallest K)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tiles = tiles.shape[1]
    if num_tiles == 0:
        return
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    tile_slot, tile_start, tile_end = tiles[0], tiles[1], tiles[2]  # rows: contiguous
    r = a.shape[1]
    u = torch.empty(x.shape[0], r, dtype=torch.float32, device=x.device)
    block_r = min(max(triton.next_power_of_2(r), 16), 64)
    _sgmv_shrink_kernel[(num_tiles, triton.cdiv(r, block_r))](
        x, a, perm, tile_slot, tile_start, tile_end, u, x.shape[1], r, x.stride(0), a.stride(0), a.stride(1),
        u.stride(0), BLOCK_M=SGMV_BLOCK_M, BLOCK_R=block_r, BLOCK_K=64, DOT_PRECISION=precision)
    block_n = 64
    grid = (num_tiles, triton.cdiv(max_shard_size, block_n), shard_offsets.shape[0])
    _sgmv_expand_kernel[grid](u, b, perm, tile_slot, tile_start, tile_end, y, shard_offsets, shard_sizes, u.stride(0),
                              b.stride(0), b.stride(1), y.stride(0), R_MAX=max_rank, BLOCK_M=SGMV_BLOCK_M,
                              BLOCK_N=block_n, DOT_PRECISION=precision)
