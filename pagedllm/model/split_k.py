"""Host-side split-K launch planning, shared by the Triton GEMM / GEMV kernels of decode-sized batches
(``skinny_gemm``, ``quantization/fp8_triton``, ``quantization/fp8_gemv``, ``w4a16_kernel``, ``moe/decode_moe``).

At a few rows of x a projection is one pass over its weight, and the work is split over programs by rows of W
(row blocks). When the row blocks alone leave SMs idle, K is split as well, and the K slices of a row block must
then be summed. Each program writes its float32 partial, then bumps the row block's arrival counter (an atomic
add); the program that arrives last sums all the partials in split order, writes the output and resets the counter
to zero. That is one launch and no memset, and deterministic: the sum order never depends on which program
finished first. Because every launch leaves its counters at zero, CUDA-graph replays need no reset either.

The counters are one zeroed int32 buffer per device, made on first use and shared by every kernel above: they run
on one stream, each launch after the previous one finished with its counters. (The summing epilogues stay inside
each module's jitted kernel.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

COUNTERS_PER_DEVICE = 4096  # a split launch may use at most this many counters (row blocks)
_INTERPRETER_SMS = 8  # what a launch off CUDA (Triton's interpreter) plans for


@functools.cache
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The SM count of a CUDA ``device``; a small stand-in elsewhere, so that the interpreter tests split K."""
    return _cuda_sms(device.index or 0) if device.type == "cuda" else _INTERPRETER_SMS


@functools.cache
def arrival_counters(device: torch.device) -> torch.Tensor:
    """The split launches' counters on ``device``: zero between launches (each launch resets those it used)."""
    return torch.zeros(COUNTERS_PER_DEVICE, dtype=torch.int32, device=device)


def even_split(k_steps: int, wanted: int, min_steps: int) -> int:
    """The most K slices, up to ``wanted``, that divide ``k_steps`` evenly with at least ``min_steps`` each (even
    slices need no K mask)."""
    most = max(1, min(wanted, k_steps // min_steps))
    return max(d for d in range(1, most + 1) if k_steps % d == 0)


@dataclass
class SplitLaunch:
    """How a launch covers K: the grid (row blocks, K slices), each program's K slice, whether K is split (then
    ``partials`` [slices, row blocks * block_n, block_m] and ``arrivals``, else placeholders never touched), and
    whether the slices end exactly at K (no K mask)."""

    grid: tuple[int, int]
    k_per_split: int
    is_split: bool
    even_k: bool
    partials: torch.Tensor
    arrivals: torch.Tensor

    @property
    def row_blocks(self) -> int:
        return self.grid[0]

    @property
    def num_splits(self) -> int:
        return self.grid[1]


def plan_launch(n: int, k: int, out: torch.Tensor, *, block_n: int, block_k: int, block_m: int, split_k: int,
                can_split: bool = True) -> SplitLaunch:
    """The launch over W [n, k] in ``block_n`` rows and ``block_k``-wide K steps, K in ``split_k`` slices of whole
    steps (trailing slices that would be empty are dropped). One slice when ``split_k`` gives one, when
    ``can_split`` is false or when the row blocks outnumber the counters. ``out`` stands in for the partials and
    counters of an unsplit launch."""
    row_blocks = triton.cdiv(n, block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    num_splits = triton.cdiv(k, k_per_split)
    if num_splits == 1 or not can_split or row_blocks > COUNTERS_PER_DEVICE:
        k_per_split = triton.cdiv(k, block_k) * block_k
        return SplitLaunch((row_blocks, 1), k_per_split, False, k == k_per_split, out, out)
    partials = torch.empty((num_splits, row_blocks * block_n, block_m), dtype=torch.float32, device=out.device)
    return SplitLaunch((row_blocks, num_splits), k_per_split, True, k == num_splits * k_per_split, partials,
                       arrival_counters(out.device))
