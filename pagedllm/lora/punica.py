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
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, u_ptr, K, R, stride_xt, stride_as, stride_ar, stride_ut,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            cols = k_start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token * stride_xt + cols, mask=cols < K, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_as + rows[:, None] * stride_ar + cols[None, :],
                        mask=(rows[:, None] < R) & (cols[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(u_ptr + token * stride_ut + rows, acc, mask=rows < R)


@triton.jit
def _expand_kernel(u_ptr, b_ptr, slots_ptr, y_ptr, offsets_ptr, sizes_ptr, stride_ut, stride_bs, stride_bn,
                   stride_yt, R_MAX: tl.constexpr, BLOCK_N: tl.constexpr):
    token = tl.program_id(0)
    shard = tl.program_id(2)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        size = tl.load(sizes_ptr + shard)
        rows = tl.load(offsets_ptr + shard) + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N) < size
        ranks = tl.arange(0, R_MAX)
        u = tl.load(u_ptr + token * stride_ut + shard * R_MAX + ranks)
        b = tl.load(b_ptr + slot * stride_bs + rows[:, None] * stride_bn + ranks[None, :], mask=mask[:, None],
                    other=0.0).to(tl.float32)
        delta = tl.sum(b * u[None, :], axis=1)
        y_rows = y_ptr + token * stride_yt + rows
        y = tl.load(y_rows, mask=mask).to(tl.float32)
        tl.store(y_rows, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


def shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """``u[t] = A[slot_t] x[t]`` for x [T, K], A [slots, R, K]: [T, R] float32 (rows of slot -1 unwritten)."""
    num_tokens, k = x.shape
    r = a.shape[1]
    u = torch.empty(num_tokens, r, dtype=torch.float32, device=x.device)
    block_r = min(triton.next_power_of_2(r), 64)
    grid = (num_tokens, triton.cdiv(r, block_r))
    _shrink_kernel[grid](x, a, token_slots, u, k, r, x.stride(0), a.stride(0), a.stride(1), u.stride(0),
                         BLOCK_R=block_r, BLOCK_K=128)
    return u


def expand(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
           shard_offsets: torch.Tensor, shard_sizes: torch.Tensor, max_rank: int, max_shard_size: int) -> None:
    """``y[t, shard] += B[slot_t, shard] u[t, shard's ranks]`` in place, for every shard in one launch."""
    block_n = 64
    grid = (y.shape[0], triton.cdiv(max_shard_size, block_n), shard_offsets.shape[0])
    _expand_kernel[grid](u, b, token_slots, y, shard_offsets, shard_sizes, u.stride(0), b.stride(0), b.stride(1),
                         y.stride(0), R_MAX=max_rank, BLOCK_N=block_n)


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
             shard_offsets: torch.Tensor, shard_sizes: torch.Tensor, max_rank: int, max_shard_size: int) -> None:
    """The whole delta of one layer: shrink, then expand into y (rows of ``x`` and ``y`` contiguous)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    u = shrink(x, a, token_slots)
    expand(y, u, b, token_slots, shard_offsets, shard_sizes, max_rank, max_shard_size)
