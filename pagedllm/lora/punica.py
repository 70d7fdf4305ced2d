"""Triton kernels of the LoRA delta, in the Punica / S-LoRA style (SGMV): a step's tokens sorted by adapter slot and
cut into tiles of one slot each, every tile a small GEMM on the tensor cores, so that a slot's A and B are read once
per tile rather than once per token (a decode step of 128 tokens over 8 adapters: 8 tiles, not 128 reads).

``tiles.step_tiles`` (host, numpy) sorts the step's tokens by slot (the base model's, slot -1, left out) and cuts each
slot's run into tiles of ``tile_rows(T)`` sorted positions: rows (slot, start, end), then empty tiles up to
``max_tiles(T, num_slots)``. The launches depend only on the step's token count T and read the tiles from device
buffers, so a CUDA graph captured once replays with each step's tiles; an empty tile's programs do nothing.

``shrink``: ``u = A[slot] x``, [T, num_shards * r_max] float32, all shards of a fused layer (q, k and v) in one
launch. A step has too few tiles to keep the SMs busy (a decode step ~12, a prefill chunk of 8192 tokens 136, each a
long loop over K), so K is split until about ``_SHRINK_PROGRAMS_PER_SM`` programs per SM run, in at most
``_SHRINK_MAX_SPLITS`` slices (H200, Llama-3.1-8B, 8 adapters: 21 slices made a decode shrink 17 us, its summing
loop one L2 round trip per slice; one slice made a prefill shrink ~126 us, 136 programs each reading all of K). The K
slices of a tile's rank block are then summed inside the launch, by the slice that arrives last (an atomic counter
per (tile, rank block); the partials added in split order: deterministic, and the counter left at zero for the next
launch or graph replay, as in ``model/split_k.py``). The expand then reads each u once: summing the slices there
made every one of its programs (a Llama-3.1-8B gate_up has 224 column blocks per tile) read all of them again.
``expand``: ``y[:, shard] += B[slot, shard] u[:, shard's ranks]`` in place, every shard in one launch (the grid's
third axis). Ranks are padded to tl.dot's smallest side (16) by masks, so any ``max_lora_rank`` works.

CUDA only (or Triton's interpreter on CPU, for the tests); imported lazily by ``layers.py`` and ``slots.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedllm.lora.tiles import max_tiles, tile_rows
from pagedllm.model.split_k import sm_count

_SHRINK_BLOCK_K = 64
_SHRINK_PROGRAMS_PER_SM = 4
_SHRINK_MAX_SPLITS = 8
# Partials the summing program loads at once: independent loads, one L2 round trip for the four.
_SUM_LOADS_IN_FLIGHT = tl.constexpr(4)
_SHRINK_COUNTERS = 4096  # (tile, rank block) pairs a split shrink can count arrivals for
_EXPAND_BLOCK_N = 128
_MIN_DOT = 16  # tl.dot's smallest side: ranks below it are padded (masked)


@triton.jit
def _tile(tiles_ptr, sorted_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: its slot, its tokens' rows (``tokens``, ``row_mask``) and whether it has any."""
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + 3 * tile).to(tl.int64)
    start = tl.load(tiles_ptr + 3 * tile + 1)
    end = tl.load(tiles_ptr + 3 * tile + 2)
    positions = start + tl.arange(0, BLOCK_M)
    row_mask = positions < end
    tokens = tl.load(sorted_ptr + positions, mask=row_mask, other=0).to(tl.int64)
    return slot, tokens, row_mask, start < end


@triton.jit
def _shrink_slice(x_ptr, a_ptr, slot, tokens, row_mask, ranks, R, k_begin, k_end, stride_xt, stride_as, stride_ar,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``x[tokens, k_begin:k_end] @ A[slot, ranks, k_begin:k_end]^T``: [BLOCK_M, BLOCK_R] float32."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        cols = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + cols[None, :],
                    mask=row_mask[:, None] & (cols[None, :] < k_end), other=0.0)
        a = tl.load(a_ptr + slot * stride_as + ranks[None, :] * stride_ar + cols[:, None],
                    mask=(ranks[None, :] < R) & (cols[:, None] < k_end), other=0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _store_summed(acc, partial_ptrs, split_stride, mask, counter_ptr, u_ptrs, SUM_LOADS: tl.constexpr):
    """Store this K slice's ``acc`` as a partial; the slice of the (tile, rank block) that arrives last sums all
    the partials in split order (the same sum whichever came last), writes u and resets the counter."""
    num_splits = tl.num_programs(2)
    tl.store(partial_ptrs + tl.program_id(2) * split_stride, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the counter says so
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        total = tl.zeros_like(acc)
        for first in range(0, num_splits, SUM_LOADS):
            for offset in tl.static_range(SUM_LOADS):  # unrolled: the loads are issued together; added in order
                split = first + offset  # past the last split: re-read the last one and add zero
                partial = tl.load(partial_ptrs + tl.minimum(split, num_splits - 1) * split_stride, mask=mask,
                                  other=0.0, cache_modifier=".cg")
                total += tl.where(split < num_splits, partial, 0.0)
        tl.store(u_ptrs, total, mask=mask)
        tl.store(counter_ptr, 0)  # ready for the next launch (or graph replay)


@triton.jit(do_not_specialize=["k_per_split", "split_stride"])  # both vary with the step's token count
def _shrink_kernel(x_ptr, a_ptr, sorted_ptr, tiles_ptr, partial_ptr, arrivals_ptr, u_ptr, K, R, k_per_split,
                   split_stride, stride_xt, stride_as, stride_ar, stride_ut, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slot, tokens, row_mask, has_rows = _tile(tiles_ptr, sorted_ptr, BLOCK_M)
    if has_rows:
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        k_begin = tl.program_id(2) * k_per_split
        acc = _shrink_slice(x_ptr, a_ptr, slot, tokens, row_mask, ranks, R, k_begin,
                            tl.minimum(k_begin + k_per_split, K), stride_xt, stride_as, stride_ar, BLOCK_M, BLOCK_R,
                            BLOCK_K, DOT_PRECISION)
        offsets = tokens[:, None] * stride_ut + ranks[None, :]
        mask = row_mask[:, None] & (ranks[None, :] < R)
        if tl.num_programs(2) > 1:  # K split (a branch, not a constexpr: one compiled variant for every step size)
            counter = arrivals_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            _store_summed(acc, partial_ptr + offsets, split_stride, mask, counter, u_ptr + offsets,
                          _SUM_LOADS_IN_FLIGHT)
        else:
            tl.store(u_ptr + offsets, acc, mask=mask)


@triton.jit
def _expand_kernel(u_ptr, b_ptr, sorted_ptr, tiles_ptr, y_ptr, offsets_ptr, sizes_ptr, stride_ut, stride_bs,
                   stride_bn, stride_yt, R_MAX: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slot, tokens, row_mask, has_rows = _tile(tiles_ptr, sorted_ptr, BLOCK_M)
    shard = tl.program_id(2)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    size = tl.load(sizes_ptr + shard)
    if has_rows & (tl.program_id(1) * BLOCK_N < size):  # (a smaller shard of a fused layer needs fewer blocks)
        n_mask = n < size
        cols = tl.load(offsets_ptr + shard) + n
        y_ptrs = y_ptr + tokens[:, None] * stride_yt + cols[None, :]
        mask = row_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)  # first: the widest load's latency overlaps the small product
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for rank_start in tl.static_range(0, R_MAX, BLOCK_RANK):
            ranks = rank_start + tl.arange(0, BLOCK_RANK)
            u = tl.load(u_ptr + tokens[:, None] * stride_ut + shard * R_MAX + ranks[None, :],
                        mask=row_mask[:, None] & (ranks[None, :] < R_MAX), other=0.0)
            b = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + ranks[:, None],
                        mask=(ranks[:, None] < R_MAX) & n_mask[None, :], other=0.0).to(tl.float32)
            delta = tl.dot(u, b, delta, input_precision=DOT_PRECISION)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _dot_precision(dtype: torch.dtype) -> str:
    """Float32 layers multiply exactly (the tests' oracle); 16-bit ones accumulate float32 sums in TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _shrink_split(num_tokens: int, num_slots: int, num_r_blocks: int, k: int, num_sms: int) -> tuple[int, int]:
    """(columns of K per split, number of splits) for the shrink of a step of ``num_tokens`` tokens: one split
    when the counters cannot cover the launch's (tile, rank block) pairs."""
    programs = max_tiles(num_tokens, num_slots) * num_r_blocks
    wanted = _SHRINK_PROGRAMS_PER_SM * num_sms // programs
    wanted = max(1, min(wanted, _SHRINK_MAX_SPLITS, k // (2 * _SHRINK_BLOCK_K)))
    if programs > _SHRINK_COUNTERS:
        wanted = 1
    k_per_split = triton.cdiv(triton.cdiv(k, wanted), _SHRINK_BLOCK_K) * _SHRINK_BLOCK_K
    return k_per_split, triton.cdiv(k, k_per_split)


@functools.cache
def _shrink_arrivals(device: torch.device) -> torch.Tensor:
    """The split shrinks' counters on ``device`` (zero between launches). Not ``split_k.arrival_counters``: in a
    CUDA graph the shrink runs on a side stream beside the base GEMM, which may be using those at the same time;
    the shrinks themselves run one after another (all on one stream)."""
    return torch.zeros(_SHRINK_COUNTERS, dtype=torch.int32, device=device)


def shrink(x: torch.Tensor, a: torch.Tensor, sorted_tokens: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """``u[t] = A[slot_t] x[t]`` for x [T, K], A [slots, R, K]: [T, R] float32 (rows of tokens in no tile are left
    unwritten)."""
    num_tokens, k = x.shape
    num_slots, r = a.shape[0], a.shape[1]
    block_r = min(max(triton.next_power_of_2(r), _MIN_DOT), 64)
    num_r_blocks = triton.cdiv(r, block_r)
    k_per_split, num_splits = _shrink_split(num_tokens, num_slots, num_r_blocks, k, sm_count(x.device))
    u = torch.empty(num_tokens, r, dtype=torch.float32, device=x.device)
    is_split = num_splits > 1
    partials = torch.empty(num_splits, num_tokens, r, dtype=torch.float32, device=x.device) if is_split else u
    arrivals = _shrink_arrivals(x.device) if is_split else u
    grid = (max_tiles(num_tokens, num_slots), num_r_blocks, num_splits)
    _shrink_kernel[grid](x, a, sorted_tokens, tiles, partials, arrivals, u, k, r, k_per_split, partials.stride(0),
                         x.stride(0), a.stride(0), a.stride(1), u.stride(0), BLOCK_M=tile_rows(num_tokens),
                         BLOCK_R=block_r, BLOCK_K=_SHRINK_BLOCK_K, DOT_PRECISION=_dot_precision(x.dtype))
    return u


def expand(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, sorted_tokens: torch.Tensor, tiles: torch.Tensor,
           shard_offsets: torch.Tensor, shard_sizes: torch.Tensor, max_rank: int, max_shard_size: int) -> None:
    """``y[t, shard] += B[slot_t, shard] u[t, shard's ranks]`` in place (u: the shrink's [T, R]), for every shard in
    one launch."""
    num_tokens = y.shape[0]
    grid = (max_tiles(num_tokens, b.shape[0]), triton.cdiv(max_shard_size, _EXPAND_BLOCK_N), shard_offsets.shape[0])
    _expand_kernel[grid](u, b, sorted_tokens, tiles, y, shard_offsets, shard_sizes, u.stride(0), b.stride(0),
                         b.stride(1), y.stride(0), R_MAX=max_rank,
                         BLOCK_RANK=min(max(triton.next_power_of_2(max_rank), _MIN_DOT), 64),
                         BLOCK_M=tile_rows(num_tokens), BLOCK_N=_EXPAND_BLOCK_N,
                         DOT_PRECISION=_dot_precision(y.dtype))


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sorted_tokens: torch.Tensor,
             tiles: torch.Tensor, shard_offsets: torch.Tensor, shard_sizes: torch.Tensor, max_rank: int,
             max_shard_size: int) -> None:
    """The whole delta of one layer over the step's tiles (``step_tiles`` of these ``x.shape[0]`` tokens, on the
    device): shrink, then expand into y."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    u = shrink(x, a, sorted_tokens, tiles)
    expand(y, u, b, sorted_tokens, tiles, shard_offsets, shard_sizes, max_rank, max_shard_size)
