"""W4A16 GEMM: ``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)`` with W in the canonical int4 layout of
``quantization/int4.py`` (int32 [N, K / 8] packed along K, scales / zeros [N, G], an optional act-order ``perm``),
dequantized in registers. ``w4a16_linear`` picks one of three paths by the rows of x (``choose_config``):

- Up to ``GEMV_MAX_ROWS`` rows (none now: measured slower than the tl.dot kernel), the GEMV kernel, no
  ``tl.dot``. At M = 1 the layer is one pass over its 4-bit weight, so the kernel must stream at memory
  bandwidth while spending only a few instructions per weight (an H200 SM issues ~128 instructions a clock
  against ~37 int4 weights a clock of its share of HBM). Per weight:
  one and-or puts the nibble, in place, into the mantissa of the float 2^23 (``2^23 + q 16^j``: no shift, no
  int-to-float conversion), one subtract leaves ``q 16^j`` exactly, and one FMA per row of x adds its product with
  ``x 16^-j`` (the shifts are moved to x, row-independent). The zero and the scale are factored out of each group
  segment, ``scale * (sum q x - zero * sum x)``, two FMAs per word. Products accumulate elementwise per word and
  are summed over the words once, after the K loop; loads are pipelined through ``tl.range(num_stages)``.
- Up to ``DEQUANT_MIN_ROWS`` rows, the tl.dot GEMM: each program computes the transposed tile ``acc[BLOCK_N,
  BLOCK_M] = W_tile @ x_tile^T`` (as the dense skinny GEMM does, ``model/skinny_gemm.py``): the dequantized
  weight is the dot's first operand, which Hopper's MMA takes straight from registers, x's rows, padded to 16,
  the second. Nibble i of a tile's [BLOCK_N, 16] words is its 16 contiguous columns ``16 i ...``, so a tile is
  eight [BLOCK_N, 16] operands with no data moved between threads. They are the exact integers ``q - zero``,
  made two per instruction by inline assembly (``w4a16_dequant.py``: ~1.5 instructions a weight): the MMA sums
  exact products in float32 over a group segment, and the group's scale multiplies that sum once, on the
  accumulator.
- From ``DEQUANT_MIN_ROWS`` rows (a prefill chunk) the GEMM is compute-bound and cuBLAS's bf16 tiles beat a
  dequantizing kernel: W is dequantized into a bf16 scratch by ``dequantize_int4`` and multiplied by ``F.linear``
  (the dequantization reads 0.5 and writes 2 bytes per weight, small next to a GEMM of that many rows).

Both kernels read x's column ``perm[k]`` for their column k with act-order, so the sorted groups stay contiguous
at no extra launch. When W has too few row blocks to fill the SMs, K is split over programs, and the last program
of a row block to arrive sums the float32 partials in split order (deterministic, one launch, no memset;
``model/split_k.py``).

Nothing is read back to the host and the allocations are fixed-size, so calls can be captured in a CUDA graph.
Both kernels launch with programmatic dependent launch where it is on (``pagedllm/pdl.py``), the next kernel
placed after the K loop under the late trigger.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedllm import pdl
from pagedllm.model.quantization.int4 import SYMMETRIC_ZERO, TILE_K, Int4Weight
from pagedllm.model.split_k import even_split, plan_launch, sm_count
from pagedllm.model.w4a16_dequant import biased_zero, subtract_zero, tile_slices
from pagedllm.pdl import allow_later_kernels, wait_for_earlier_kernels

# From this many rows of x on, dequantize + cuBLAS (module docstring). On the H200 (benchmarks/h200/session30, a
# Llama-3.1-8B layer's four projections) the tl.dot kernel in dot_config's shape took 336 us at 256 rows and 473 at
# 384, against 417 and 479 us for dequantize + cuBLAS; at 512 rows dequantize + cuBLAS won, 536 against 563 us.
DEQUANT_MIN_ROWS = 512
# Up to this many rows of x, the GEMV kernel (0: never). On the H200 sweep the tl.dot kernel in dot_config's shape
# ran the four projections of a Llama-3.1-8B layer at one row in 64.7 us against the GEMV's 71.9
# (benchmarks/h200/session29), so decode takes the tl.dot kernel; the GEMV stays for measurement
# (w4a16_microbench.py times it at 1, 2 and 4 rows).
GEMV_MAX_ROWS = 0
# With act-order, the kernels read x's column perm[k] for their column k: a gather the software pipeline does not
# cover (21 global loads a K step instead of 4, and a re-layout through shared memory, by the offline SASS of
# w4a16_gemv_sass.py). True: x is permuted once by torch before the kernel instead (one more launch, the kernel's
# loop then that of a weight without act-order). On the H200 (benchmarks/h200/session30, w4a16_microbench.py
# --act-order, a Llama-3.1-8B layer's four projections) permuting first took 89.6 us against the gather's 91.8 at
# one row, 93.0 against 200.2 at 16 rows and 197.2 against 2,011 at 128; without act-order 64.8, 69.0 and 166.9.
PERMUTE_X_FIRST = True
_FLOAT_2POW23_BITS = 0x4B000000  # float32 2^23, mantissa all zero: OR-ing an integer q < 2^23 in gives 2^23 + q
_TILE_K = tl.constexpr(TILE_K)
_SYMMETRIC_ZERO = tl.constexpr(float(SYMMETRIC_ZERO))  # the zero of a weight whose checkpoint has none


@dataclass(frozen=True)
class W4A16Config:
    """Launch shape: rows of W and of x per program, K slices, warps and pipeline depth (K advances one canonical
    tile of 128 columns per loop step), and the kernel: ``gemv`` (no tl.dot, at most ``block_m`` rows of x) or
    the tl.dot one, whose weights ``asm_dequant`` turns into dot operands by inline assembly (``w4a16_dequant``;
    False: the same values by plain Triton, to measure what the assembly buys)."""

    block_n: int
    block_m: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    gemv: bool = False
    asm_dequant: bool = True


# -- shared by both kernels --------------------------------------------------------------------------------------


@triton.jit
def _store_output(acc, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om, HAS_BIAS: tl.constexpr):
    """Add the bias and write ``acc`` [BLOCK_N, BLOCK_M] (transposed) into ``out`` [num_rows, N]."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < num_rows)
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(acc, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, row_block, split, num_splits, offs_n, offs_m,
            num_rows, N, stride_om, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr):
    """Write a program's ``acc`` [BLOCK_N, BLOCK_M]. With IS_SPLIT (K split over ``num_splits`` programs, x in one
    row block) store it as a partial instead, and the last K slice of the row block to arrive sums all the
    partials in split order (deterministic: the same sum whichever came last) and writes the output."""
    if IS_SPLIT:
        block_n: tl.constexpr = acc.shape[0]
        block_m: tl.constexpr = acc.shape[1]
        # partials [num_splits, BLOCK_M, row blocks * BLOCK_N], x's rows outermost and only those < num_rows
        # written and read: at one row of x (padded to 16 for the MMA) a program's partial is BLOCK_N contiguous
        # floats, not BLOCK_N x BLOCK_M.
        width = tl.num_programs(0) * block_n
        tile = tl.arange(0, block_m)[None, :] * width + offs_n[:, None]
        rows_of_x = tl.arange(0, block_m)[None, :] < num_rows
        split_stride = width * block_m
        tl.store(partial_ptr + split * split_stride + tile, acc, mask=rows_of_x)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(arrivals_ptr + row_block, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            total = tl.zeros((block_n, block_m), dtype=tl.float32)
            for s in range(num_splits):  # fixed order
                total += tl.load(partial_ptr + s * split_stride + tile, mask=rows_of_x, other=0.0,
                                 cache_modifier=".cg")
            _store_output(total, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om, HAS_BIAS)
            tl.store(arrivals_ptr + row_block, 0)  # ready for the next launch (or graph replay)
    else:
        _store_output(acc, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om, HAS_BIAS)


@triton.jit
def _group_of(col_start, num_groups, GROUP_SIZE: tl.constexpr):
    """The group holding column ``col_start`` (GROUP_SIZE 0: one group), clamped: past K (in a padded tile) the
    scale read must stay finite."""
    if GROUP_SIZE == 0:
        return 0
    else:
        return tl.minimum(col_start // GROUP_SIZE, num_groups - 1)


# -- the tl.dot GEMM -------------------------------------------------------------------------------------------------


@triton.jit
def _input_segment(x_seg, x_row_ptrs, perm_ptr, row_mask, tile_start, K, OFFSET: tl.constexpr,
                   HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """x's columns ``tile_start + OFFSET ...`` of one scale segment (through ``perm`` with act-order), transposed:
    [width, BLOCK_M]. ``x_seg`` points at the tile's first ``width`` columns, so that without act-order the
    segment's address is a constant offset from it (no address arithmetic per segment); ``x_row_ptrs`` [1,
    BLOCK_M] at the rows' column 0."""
    width: tl.constexpr = x_seg.shape[0]
    offs_k = tile_start + OFFSET + tl.arange(0, width)[:, None]
    mask = row_mask
    if not EVEN_K:
        mask = mask & (offs_k < K)
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_k, mask=offs_k < K, other=0)
        return tl.load(x_row_ptrs + cols, mask=mask, other=0.0)
    else:
        return tl.load(x_seg + OFFSET, mask=mask, other=0.0)


@triton.jit
def _dot_tile(
    acc, packed, x_seg, x_row_ptrs, perm_ptr, scales_ptr, zeros_ptr, rows, row_mask, tile_start, K, num_groups,
    stride_sn, stride_zn, GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr,
    EVEN_K: tl.constexpr, ASM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``acc`` plus one canonical tile's product: per group segment one dot of the exact integers ``q - zero``
    (``w4a16_dequant``) with x, whose float32 sum of exact products is scaled once: the per-weight work is the
    packed unpack and subtract only. ``x_seg`` [16 x slices per segment, BLOCK_M]: ``_input_segment``."""
    dtype = x_seg.dtype.element_ty
    slices = tile_slices(packed, dtype, ASM)
    per_segment: tl.constexpr = x_seg.shape[0] // 16
    for seg in tl.static_range(8 // per_segment):
        seg_start = tile_start + 16 * per_segment * seg
        group = _group_of(seg_start, num_groups, GROUP_SIZE)
        scale = tl.load(scales_ptr + rows * stride_sn + group).to(tl.float32)
        if HAS_ZEROS:
            zero = biased_zero(tl.load(zeros_ptr + rows * stride_zn + group), dtype)[:, None]
        else:
            zero = biased_zero(tl.full((1, 1), 8, tl.int32), dtype)
        w = subtract_zero(_side_by_side(slices, seg * per_segment, per_segment), zero, ASM)
        x = _input_segment(x_seg, x_row_ptrs, perm_ptr, row_mask, tile_start, K, 16 * per_segment * seg,
                           HAS_PERM, EVEN_K)
        acc += tl.dot(w, x, input_precision=DOT_PRECISION) * scale[:, None]
    return acc


@triton.jit
def _side_by_side(slices, FIRST: tl.constexpr, COUNT: tl.constexpr):
    """``slices[FIRST : FIRST + COUNT]`` ([rows, 16] each) as one [rows, 16 COUNT] dot operand. In the dot
    operand's layout a thread holds the same columns of each 16-wide block, so the concatenation moves no data
    (the offline SASS shows no re-layout): one dot per segment instead of one per slice, over one load of x."""
    if COUNT == 2:
        joined = tl.permute(tl.join(slices[FIRST], slices[FIRST + 1]), (0, 2, 1))
    elif COUNT == 4:
        joined = tl.permute(_join4(slices, FIRST), (0, 3, 2, 1))
    else:
        joined = tl.permute(tl.join(_join4(slices, FIRST), _join4(slices, FIRST + 4)), (0, 4, 3, 2, 1))
    return tl.reshape(joined, (joined.shape[0], 16 * COUNT))


@triton.jit
def _join4(slices, FIRST: tl.constexpr):
    """[rows, 16, 2, 2]: ``slices[FIRST + 2 b + a]`` at [:, :, a, b]."""
    return tl.join(tl.join(slices[FIRST], slices[FIRST + 1]), tl.join(slices[FIRST + 2], slices[FIRST + 3]))


@triton.jit(do_not_specialize=["num_rows"])
def _w4a16_gemm_kernel(
    x_ptr, perm_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    num_rows, N, K, padded_k, k_per_split, num_groups, stride_xm, stride_qn, stride_sn, stride_zn, stride_om,
    HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    ASM: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (row block of W, row block of x, K slice): one partial product with ``tl.dot``, one canonical tile
    per K step; split over K (IS_SPLIT) only with a single row block of x."""
    wait_for_earlier_kernels(USE_PDL)
    row_block = tl.program_id(0)
    split = tl.program_id(2)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past N re-read row N - 1: no row mask on the weight stream; those results are never stored.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_row_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    row_mask = offs_m[None, :] < num_rows
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_per_split, padded_k - k_start)  # the last slice may be shorter
    # K slices are whole tiles (16 words): saying so lets the tile's loads take 16 bytes at a time.
    first_word = tl.multiple_of(k_start // 8, 16)
    w_ptrs = qw_ptr + rows[:, None] * stride_qn + (first_word + tl.arange(0, 16))[None, :]
    # x is read a scale segment at a time: a group's columns, at most a tile's
    segment: tl.constexpr = _TILE_K if GROUP_SIZE == 0 or GROUP_SIZE >= _TILE_K else GROUP_SIZE
    x_seg = x_row_ptrs + k_start + tl.arange(0, segment)[:, None]
    for k in range(0, k_stop, _TILE_K):
        packed = tl.load(w_ptrs)  # one canonical tile: 16 words per row (the K padding makes it always whole)
        acc = _dot_tile(acc, packed, x_seg, x_row_ptrs, perm_ptr, scales_ptr, zeros_ptr, rows, row_mask,
                        k_start + k, K, num_groups, stride_sn, stride_zn, GROUP_SIZE, HAS_PERM, HAS_ZEROS, EVEN_K,
                        ASM, DOT_PRECISION)
        w_ptrs += 16
        x_seg += _TILE_K
    allow_later_kernels(USE_PDL)
    _finish(acc, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, row_block, split, tl.num_programs(2), offs_n, offs_m,
            num_rows, N, stride_om, HAS_BIAS, IS_SPLIT)


# -- the GEMV kernel (module docstring) -----------------------------------------------------------------------------

_FLOAT_2POW23 = tl.constexpr(8388608.0)


@triton.jit
def _word_offsets():
    """Offsets 0..15 of a tile's words as [1, 4, 1, 4]. The GEMV kernel's tensors are [rows of x, 4, rows of W,
    4], a row's words ``4 a + b`` on dims 1 and 3: Triton 3.6 then gives the weight load 4 threads a row of W, 4
    words (16 bytes) each, and the scale and zero loads (a value per row, copied on dim 1) the same threads, so
    nothing is re-laid out through shared memory (``benchmarks/scripts/w4a16_gemv_sass.py`` checks it)."""
    return 4 * tl.arange(0, 4)[None, :, None, None] + tl.arange(0, 4)[None, None, None, :]


@triton.jit
def _nibbles(packed, I: tl.constexpr, float_2pow23_bits):
    """Nibble I of each word times ``16^j``, as float32 (j: its position in the word as read, see
    ``_gemv_segment``), exactly: the and-or puts it in the mantissa of 2^23 (0x4B000000 passed at run time, so
    that in a register the and and the or compile to one LOP3), subtracting 2^23 leaves it."""
    if I < 4:
        bits = (packed & (0xF << (4 * I))) | float_2pow23_bits
    else:  # nibbles 4..7 at positions 1..4: position 0 of a shifted word compiles to a bit-field extract
        bits = ((packed >> 12) & (0xF << (4 * (I - 3)))) | float_2pow23_bits
    return bits.to(tl.float32, bitcast=True) - _FLOAT_2POW23


@triton.jit
def _gemv_input(x_ptr, perm_ptr, offs_m, cols, num_rows, K, stride_xm, HAS_PERM: tl.constexpr,
                EVEN_K: tl.constexpr):
    """x's columns ``cols`` [1, 4, 1, 4] (through ``perm`` with act-order) of rows ``offs_m`` [BLOCK_M, 1, 1, 1],
    as float32 [BLOCK_M, 4, 1, 4]; zero past K and past ``num_rows``."""
    mask = offs_m < num_rows
    if not EVEN_K:
        mask = mask & (cols < K)
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols, mask=cols < K, other=0)
    return tl.load(x_ptr + offs_m * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gemv_segment(packed, x_ptr, perm_ptr, offs_m, seg_start, num_rows, K, stride_xm, float_2pow23_bits,
                  SEG: tl.constexpr, SLICES: tl.constexpr, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """``sum q x`` per word [BLOCK_M, 4, BLOCK_N, 4] and ``sum x`` [BLOCK_M, 4, 1, 4] over one scale segment of
    a tile: nibbles ``SEG * SLICES ...``, all in one group.

    Nibble i of a word is the tile's column ``16 i + w``. It is read in place, times 16^j (j = i for i < 4, from
    the word shifted by 12 for the others), so x is scaled by 16^-j instead (exact, and row-independent): per
    weight an and-or, a subtract and one FMA per row of x."""
    for s in tl.static_range(SLICES):
        i = SEG * SLICES + s
        cols = seg_start + 16 * s + _word_offsets()
        x = _gemv_input(x_ptr, perm_ptr, offs_m, cols, num_rows, K, stride_xm, HAS_PERM, EVEN_K)
        x_scaled = x * (1.0 / (1 << (4 * i))) if i < 4 else x * (1.0 / (1 << (4 * (i - 3))))
        if s == 0:
            qx = _nibbles(packed, i, float_2pow23_bits) * x_scaled
            x_sum = x
        else:
            qx += _nibbles(packed, i, float_2pow23_bits) * x_scaled
            x_sum += x
    return qx, x_sum


@triton.jit
def _segment_scale_zero(scales_ptr, zeros_ptr, rows, seg_start, num_groups, stride_sn, stride_zn,
                        GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """The scale and zero (float32 [1, 4, BLOCK_N, 1], copied on dim 1) of the group holding ``seg_start``."""
    group = _group_of(seg_start, num_groups, GROUP_SIZE)
    copies = tl.zeros((1, 4, 1, 1), tl.int32)
    scale = tl.load(scales_ptr + rows * stride_sn + group + copies).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + rows * stride_zn + group + copies).to(tl.float32)
    else:
        zero = _SYMMETRIC_ZERO
    return scale, zero


@triton.jit
def _gemv_tile(
    acc, qw_ptr, x_ptr, perm_ptr, scales_ptr, zeros_ptr, rows, offs_m, tile, num_rows, K, num_groups, stride_xm,
    stride_qn, stride_sn, stride_zn, float_2pow23_bits, GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr,
):
    """``acc`` plus one canonical tile's ``scale * (sum q x - zero * sum x)`` per group segment, elementwise per
    word (two FMAs per word and segment; the words are summed after the K loop)."""
    tile_start = tile * _TILE_K
    slices: tl.constexpr = 8 if GROUP_SIZE == 0 or GROUP_SIZE >= _TILE_K else GROUP_SIZE // 16
    # The first segment's scale and zero ahead of the weights: in this order Triton keeps the products in the
    # weights' layout (the other way round, it loads x a second time in the scales' layout).
    scale, zero = _segment_scale_zero(scales_ptr, zeros_ptr, rows, tile_start, num_groups, stride_sn, stride_zn,
                                      GROUP_SIZE, HAS_ZEROS)
    # One canonical tile: 16 words per row (K's padding to whole tiles makes it always whole).
    packed = tl.load(qw_ptr + rows * stride_qn + tile * 16 + _word_offsets(), eviction_policy="evict_first")
    for seg in tl.static_range(8 // slices):
        seg_start = tile_start + 16 * slices * seg
        if seg > 0:
            scale, zero = _segment_scale_zero(scales_ptr, zeros_ptr, rows, seg_start, num_groups, stride_sn,
                                              stride_zn, GROUP_SIZE, HAS_ZEROS)
        qx, x_sum = _gemv_segment(packed, x_ptr, perm_ptr, offs_m, seg_start, num_rows, K, stride_xm,
                                  float_2pow23_bits, seg, slices, HAS_PERM, EVEN_K)
        acc += scale * (qx - zero * x_sum)
    return acc


@triton.jit(do_not_specialize=["num_rows"])
def _w4a16_gemv_kernel(
    x_ptr, perm_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    num_rows, N, K, padded_k, k_per_split, num_groups, stride_xm, stride_qn, stride_sn, stride_zn, stride_om,
    float_2pow23_bits, HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (row block of W, K slice): ``x W^T`` for x's few rows without ``tl.dot``, one canonical tile
    ([BLOCK_N, 16] words) per K step, its loads pipelined STAGES deep; products accumulate per word, and the
    words are summed after the K loop."""
    wait_for_earlier_kernels(USE_PDL)
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N re-read row N - 1: no row mask on the weight stream; those results are never stored.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)[None, None, :, None]
    offs_m = tl.arange(0, BLOCK_M)[:, None, None, None]
    acc = tl.zeros((BLOCK_M, 4, BLOCK_N, 4), tl.float32)
    first_tile = split * (k_per_split // _TILE_K)
    last_tile = tl.minimum(first_tile + k_per_split // _TILE_K, padded_k // _TILE_K)
    for tile in tl.range(first_tile, last_tile, num_stages=STAGES):
        acc = _gemv_tile(acc, qw_ptr, x_ptr, perm_ptr, scales_ptr, zeros_ptr, rows, offs_m, tile, num_rows, K,
                         num_groups, stride_xm, stride_qn, stride_sn, stride_zn, float_2pow23_bits, GROUP_SIZE,
                         HAS_PERM, HAS_ZEROS, EVEN_K)
    allow_later_kernels(USE_PDL)
    total = tl.trans(tl.sum(tl.sum(acc, axis=3), axis=1))  # [BLOCK_N, BLOCK_M]
    _finish(total, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, row_block, split, tl.num_programs(1), offs_n,
            tl.arange(0, BLOCK_M), num_rows, N, stride_om, HAS_BIAS, IS_SPLIT)


# -- dequantize + cuBLAS --------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_slice(
    packed, scales_ptr, zeros_ptr, rows, col_start, group_size, num_groups, stride_sn, stride_zn, SLICE: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr,
):
    """Columns ``col_start .. + 16`` of W's rows from a [BLOCK_N, 16] block of canonical words (their nibble
    SLICE), as [BLOCK_N, 16] in DTYPE. A slice never straddles two groups (groups are multiples of 16 wide, or
    one); past K (a padded tile) the group is clamped so that the scale read is finite."""
    q = ((packed >> (4 * SLICE)) & 0xF).to(tl.float32)
    group = tl.minimum(col_start // group_size, num_groups - 1)
    scale = tl.load(scales_ptr + rows * stride_sn + group).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + rows * stride_zn + group).to(tl.float32)
    else:
        zero = tl.full((BLOCK_N,), _SYMMETRIC_ZERO, tl.float32)
    return ((q - zero[:, None]) * scale[:, None]).to(DTYPE)


@triton.jit
def _dequantize_kernel(
    qw_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, group_size, num_groups, stride_qn, stride_sn, stride_zn,
    BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr,
):
    """Program (row block, canonical tile): W's 128 columns of the tile dequantized into ``out`` [N, K]."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.program_id(1)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    packed = tl.load(qw_ptr + rows[:, None] * stride_qn + tile * 16 + tl.arange(0, 16)[None, :])
    for i in tl.static_range(8):
        col_start = tile * 128 + 16 * i
        w = _dequantize_slice(packed, scales_ptr, zeros_ptr, rows, col_start, group_size, num_groups, stride_sn,
                              stride_zn, i, BLOCK_N, HAS_ZEROS, out_ptr.dtype.element_ty)
        offs_k = col_start + tl.arange(0, 16)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w, mask=mask)


# -- dispatch and launches -----------------------------------------------------------------------------------------


def choose_config(num_rows: int, n: int, k: int, num_sms: int) -> W4A16Config:
    """A launch shape (and so the kernel) for x [num_rows, k] times W [n, k] on a device of ``num_sms`` SMs: up to
    ``GEMV_MAX_ROWS`` rows the GEMV kernel, else the tl.dot one (from ``DEQUANT_MIN_ROWS`` rows ``w4a16_linear``
    takes dequantize + cuBLAS instead)."""
    if num_rows <= GEMV_MAX_ROWS:
        return gemv_config(num_rows, n, k, num_sms)
    return dot_config(num_rows, n, k, num_sms)


@functools.cache
def gemv_config(num_rows: int, n: int, k: int, num_sms: int) -> W4A16Config:
    """The GEMV kernel's shape: 128-row blocks of W (4 rows a thread, the x work shared by them), 4 warps, K split
    to ~4 programs per SM; no software pipeline at one row, a 3-deep one above (the H200 sweep of session 26,
    benchmarks/h200/issue16-w4a16/session26: at M = 1 one stage beat three on all four Llama-3.1-8B shapes, 71
    against 92 us a layer; at M = 4 three stages won)."""
    stages = 1 if num_rows == 1 else 3
    return W4A16Config(128, triton.next_power_of_2(num_rows), _k_split(n, k, 128, 16, 4 * num_sms), 4, stages,
                       gemv=True)


@functools.cache
def dot_config(num_rows: int, n: int, k: int, num_sms: int) -> W4A16Config:
    """The tl.dot kernel's shape, from the H200 sweep of session 29 (``w4a16_microbench.py --sweep``,
    benchmarks/h200/session29): 64-row blocks of W, one warpgroup, a 3-deep pipeline were the best or within 6% of
    it at every Llama-3.1-8B shape and 1, 16, 64 and 128 rows of x (the earlier 128-row blocks cost 10-45%).
    x is padded to 16, 32, 64 or 128 rows; K is split as ``_dot_split`` says."""
    block_m = max(16, triton.next_power_of_2(min(num_rows, 128)))
    return W4A16Config(64, block_m, _dot_split(n, k, block_m, num_sms), num_warps=4, num_stages=3)


def _dot_split(n: int, k: int, block_m: int, num_sms: int) -> int:
    """K slices of the tl.dot kernel. Up to 32 rows the weight stream is the cost and long slices pipeline best:
    about 8 tiles a slice, at most 8 slices, whatever the grid (gate_up: 4 slices over 1,792 programs beat 2 and
    8), more only where the layer has too few row blocks for ~2 programs an SM. From 64 rows the MMA work per
    weight grows, and fewer, longer programs win: ~4 programs an SM at 64 rows, ~2 at 128, at most 4 slices."""
    row_blocks, tiles = triton.cdiv(n, 64), triton.cdiv(k, TILE_K)
    if block_m <= 32:
        return even_split(tiles, min(8, max(tiles // 8, triton.cdiv(2 * num_sms, row_blocks))), 2)
    return even_split(tiles, min(4, triton.cdiv(num_sms * 256 // block_m, row_blocks)), 2)


def _k_split(n: int, k: int, block_n: int, max_split: int, programs: int) -> int:
    """K slices (at most ``max_split``, whole tiles, at least two a slice) so that the grid has ~``programs``."""
    wanted = min(max_split, triton.cdiv(programs, triton.cdiv(n, block_n)))
    return even_split(triton.cdiv(k, TILE_K), wanted, 2)


def w4a16_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None,
                 config: W4A16Config | None = None, dequant_min_rows: int | None = None,
                 permute_x_first: bool | None = None) -> torch.Tensor:
    """``x W^T + bias`` for x [..., K] (half precision on CUDA; float32 in the interpreter) and W in the canonical
    int4 layout; a new tensor [..., N] in x's dtype. ``config`` / ``dequant_min_rows`` / ``permute_x_first``
    override the choices (tests, tuning)."""
    n, k = weight.qweight.shape[0], weight.input_size
    x2d = x.reshape(-1, k)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    num_rows = x2d.shape[0]
    dequantize = num_rows >= (DEQUANT_MIN_ROWS if dequant_min_rows is None else dequant_min_rows)
    perm = weight.perm
    if perm is not None and (dequantize or (PERMUTE_X_FIRST if permute_x_first is None else permute_x_first)):
        x2d, perm = x2d.index_select(1, perm), None
    if dequantize:
        return F.linear(x2d, dequantize_int4(weight, x.dtype), bias).view(*x.shape[:-1], n)
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows:
        _launch_gemm(x2d, weight, perm, bias, out, config or choose_config(num_rows, n, k, sm_count(x.device)))
    return out.view(*x.shape[:-1], n)


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` (columns in the kernel's order), by one Triton launch."""
    n, k = weight.qweight.shape[0], weight.input_size
    out = torch.empty((n, k), dtype=dtype, device=weight.qweight.device)
    block_n = 64
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    _dequantize_kernel[(triton.cdiv(n, block_n), weight.qweight.shape[1] // 16)](
        weight.qweight, weight.scales, zeros, out, n, k, weight.group_size, weight.scales.shape[1],
        weight.qweight.stride(0), weight.scales.stride(0), zeros.stride(0),
        BLOCK_N=block_n, HAS_ZEROS=weight.zeros is not None, num_warps=4,
    )
    return out


def _launch_gemm(x: torch.Tensor, weight: Int4Weight, perm: torch.Tensor | None, bias: torch.Tensor | None,
                 out: torch.Tensor, config: W4A16Config) -> None:
    """Launch the kernel ``config`` names; ``perm``: the act-order permutation the kernel applies to x's columns
    (None: x is in the weight's column order already)."""
    num_rows, k = x.shape
    n, padded_k = out.shape[1], weight.qweight.shape[1] * 8
    m_blocks = triton.cdiv(num_rows, config.block_m)
    if config.gemv and m_blocks > 1:
        raise ValueError(f"the GEMV kernel takes at most block_m = {config.block_m} rows of x, got {num_rows}")
    # K in whole canonical tiles (padded_k is a multiple of TILE_K); split only with x in one row block.
    launch = plan_launch(n, padded_k, out, block_n=config.block_n, block_k=TILE_K, block_m=config.block_m,
                         split_k=config.split_k, can_split=m_blocks == 1)
    zeros = weight.zeros if weight.zeros is not None else weight.scales  # placeholder when symmetric
    operands = (x, perm if perm is not None else x, weight.qweight, weight.scales, zeros,
                bias if bias is not None else out, out, launch.partials, launch.arrivals)
    flags = {"HAS_PERM": perm is not None, "HAS_ZEROS": weight.zeros is not None, "HAS_BIAS": bias is not None,
             "IS_SPLIT": launch.is_split, "EVEN_K": k == padded_k, "BLOCK_N": config.block_n,
             "BLOCK_M": config.block_m, "num_warps": config.num_warps, **pdl.launch_options(x.device)}
    strides = (x.stride(0), weight.qweight.stride(0), weight.scales.stride(0), zeros.stride(0), out.stride(0))
    k_per_split = launch.k_per_split
    if config.gemv:
        _w4a16_gemv_kernel[launch.grid](
            *operands, num_rows, n, k, padded_k, k_per_split, weight.scales.shape[1], *strides, _FLOAT_2POW23_BITS,
            **flags, GROUP_SIZE=_kernel_group_size(weight), STAGES=config.num_stages,
        )
    else:
        _w4a16_gemm_kernel[(launch.row_blocks, m_blocks, launch.num_splits)](
            *operands, num_rows, n, k, padded_k, k_per_split, weight.scales.shape[1], *strides, **flags,
            GROUP_SIZE=_kernel_group_size(weight), ASM=config.asm_dequant and _has_asm_dequant(x),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_stages=config.num_stages,
        )


def _has_asm_dequant(x: torch.Tensor) -> bool:
    """The inline-asm dequantization (``w4a16_dequant``) runs compiled (not in Triton's interpreter) on 16-bit x."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not interpreted


def _kernel_group_size(weight: Int4Weight) -> int:
    """The kernels' GROUP_SIZE: 0 for one group, else the group size, which must be a multiple of 16 that divides
    a tile or is a multiple of one (a scale segment of the kernels then never straddles two groups)."""
    if weight.scales.shape[1] == 1:
        return 0
    size = weight.group_size
    if size % 16 or (TILE_K % size and size % TILE_K):
        raise ValueError(f"the W4A16 GEMV kernel needs groups of 16 * 2^i columns, got {size}")
    return size
