"""SiLU-and-mul in the epilogue of a fused gate/up projection's decode GEMM (the skinny GEMM, FP8's one-row GEMV,
the W4A16 kernels).

A gate/up weight stores the gate rows, then the up rows. A program of the fused variant takes the gate and the up
row of each of its ``BLOCK_N / 2`` output columns, interleaved (``gate_up_rows``: no weight is re-laid out), so its
accumulator holds both factors of every column it writes, and ``store_silu_mul`` writes ``silu(gate) * up`` where
the GEMM would have written ``[gate, up]``: one launch and one [rows, 2 x intermediate] write and read fewer per
layer than the GEMM followed by the activation kernel, rounded as those two round.

Imported by the kernel modules only (it needs Triton).
"""

from __future__ import annotations

import triton
import triton.language as tl


def check_block_pairs(block_n: int) -> None:
    """A program's rows come in gate/up pairs: its row block must be even."""
    if block_n % 2:
        raise ValueError(f"the gate/up epilogue pairs rows: block_n must be even, got {block_n}")


@triton.jit
def gate_up_rows(row_block, N, BLOCK_N: tl.constexpr):
    """The W rows of a gate/up program: gate row c at even positions and up row c (``N / 2`` further) at odd ones,
    for its ``BLOCK_N / 2`` output columns c; columns past the end re-read the last one (never stored)."""
    positions = tl.arange(0, BLOCK_N)
    columns = tl.minimum(row_block * (BLOCK_N // 2) + positions // 2, N // 2 - 1)
    return columns + (positions % 2) * (N // 2)


@triton.jit
def store_silu_mul(gate_up, out_ptr, row_block, offs_m, num_rows, d, stride_om, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """Write ``silu(gate) * up`` of ``gate_up`` [BLOCK_N, BLOCK_M] (float32, the rows of ``gate_up_rows``, x's rows
    along BLOCK_M) into ``out`` [num_rows, d], rounded as the GEMM's output and then the separate activation round
    it: gate and up to out's dtype, then silu, then the product."""
    dtype = out_ptr.dtype.element_ty
    rounded = gate_up.to(dtype).to(tl.float32)
    gate, up = tl.split(tl.permute(tl.reshape(rounded, (BLOCK_N // 2, 2, BLOCK_M)), (0, 2, 1)))
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # torch rounds F.silu's output first
    columns = row_block * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    mask = (columns[:, None] < d) & (offs_m[None, :] < num_rows)
    tl.store(out_ptr + offs_m[None, :] * stride_om + columns[:, None], (silu * up).to(dtype), mask=mask)
