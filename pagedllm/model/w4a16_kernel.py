"""W4A16 GEMM: ``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)`` with W in the canonical int4 layout of
``quantization/int4.py`` (int32 [N, K / 8] packed along K, scales / zeros [N, G], an optional act-order ``perm``),
dequantized in registers.

One kernel serves decode and prefill shapes. Each program owns ``BLOCK_N`` rows of W, ``BLOCK_M`` rows of x and a
slice of K, and computes the transposed tile ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T`` with ``tl.dot`` (as the
dense skinny GEMM does, ``model/skinny_gemm.py``): the dequantized weight is the dot's first operand, which Hopper's
MMA can take straight from registers, and x's rows, padded to 16, are the second. Each K step loads one canonical
tile, [BLOCK_N, 16] int32 words (64 contiguous bytes per row); nibble i of those words is the 16 contiguous columns
``16 i ...`` of the tile, so eight shifts give eight [BLOCK_N, 16] operands with no data moved between threads,
each dequantized as ``(q - zero) * scale`` in float32 with its group's scale (a 16-column slice never straddles
groups) and fed to its own dot. With act-order the kernel reads x's column ``perm[k]`` for its column k, so the
sorted groups stay contiguous at no extra launch.

At batch 1..16 the layer is one pass over its 4-bit weight, a quarter of the bf16 bytes, so the grid needs many
programs in flight: when W has too few row blocks for the SMs, K is split, and the last program of a row block to
arrive sums the float32 partials in split order (deterministic, one launch, no memset; same scheme as the skinny
GEMM). For many rows (a prefill chunk) the GEMM is compute-bound and cuBLAS's bf16 tiles beat a dequantizing
kernel, so above ``DEQUANT_MIN_ROWS`` rows W is dequantized into a bf16 scratch by ``dequantize_int4`` and
multiplied by ``F.linear``: the dequantization reads 0.5 and writes 2 bytes per weight, small next to a GEMM of
that many rows.

Nothing is read back to the host and the allocations are fixed-size, so calls can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedllm.model.quantization.int4 import TILE_K, Int4Weight

# From this many rows of x on, dequantize + cuBLAS (module docstring): on an H200 the two tie at 64 rows on
# Llama-3.1-8B's projections and the dequantizing path wins 1.3-2.6x at 128 (benchmarks/h200/issue16-w4a16).
DEQUANT_MIN_ROWS = 64
_MAX_ROW_BLOCKS_SPLIT = 4096  # counters per device for split launches


@dataclass(frozen=True)
class W4A16Config:
    """Launch shape: rows of W and of x per program, K slices, warps and pipeline depth (K advances one canonical
    tile of 128 columns per loop step)."""

    block_n: int
    block_m: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


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
        zero = tl.full((BLOCK_N,), 8.0, tl.float32)
    return ((q - zero[:, None]) * scale[:, None]).to(DTYPE)


@triton.jit
def _input_slice(x_ptr, perm_ptr, x_rows, num_rows, col_start, K, stride_xm, HAS_PERM: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """x's columns ``col_start .. + 16`` (through ``perm`` with act-order), transposed: [16, BLOCK_M]."""
    offs_k = col_start + tl.arange(0, 16)
    mask = x_rows < num_rows
    if not EVEN_K:
        mask = mask & (offs_k[:, None] < K)
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_k, mask=offs_k < K, other=0)
    else:
        cols = offs_k
    return tl.load(x_ptr + x_rows * stride_xm + cols[:, None], mask=mask, other=0.0)


@triton.jit
def _store_output(acc, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om, HAS_BIAS: tl.constexpr):
    """Add the bias and write ``acc`` [BLOCK_N, BLOCK_M] (transposed) into ``out`` [num_rows, N]."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < num_rows)
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def _w4a16_gemm_kernel(
    x_ptr, perm_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    num_rows, N, K, padded_k, k_per_split, group_size, num_groups, stride_xm, stride_qn, stride_sn, stride_zn, stride_om,
    HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (row block of W, row block of x, K slice): one partial product; with IS_SPLIT (a single row block
    of x) the last K slice to arrive sums them all in split order."""
    row_block = tl.program_id(0)
    split = tl.program_id(2)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past N re-read row N - 1: no row mask on the weight stream; those results are never stored.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_rows = offs_m[None, :].to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_per_split, padded_k - k_start)  # the last slice may be shorter
    w_ptrs = qw_ptr + rows[:, None] * stride_qn + (k_start // 8 + tl.arange(0, 16))[None, :]
    for k in range(0, k_stop, 128):
        packed = tl.load(w_ptrs)  # one canonical tile: 16 words per row (the K padding makes it always whole)
        for i in tl.static_range(8):
            col_start = k_start + k + 16 * i
            w = _dequantize_slice(packed, scales_ptr, zeros_ptr, rows, col_start, group_size, num_groups, stride_sn,
                                  stride_zn, i, BLOCK_N, HAS_ZEROS, dtype)
            x = _input_slice(x_ptr, perm_ptr, x_rows, num_rows, col_start, K, stride_xm, HAS_PERM, EVEN_K)
            acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        w_ptrs += 16
    if IS_SPLIT:
        num_splits = tl.num_programs(2)
        tile = offs_n[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        split_stride = tl.num_programs(0) * BLOCK_N * BLOCK_M
        tl.store(partial_ptr + split * split_stride + tile, acc)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(arrivals_ptr + row_block, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(0, num_splits):  # fixed order: the same sum whichever slice came last
                total += tl.load(partial_ptr + s * split_stride + tile, cache_modifier=".cg")
            _store_output(total, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om, HAS_BIAS)
            tl.store(arrivals_ptr + row_block, 0)  # ready for the next launch (or graph replay)
    else:
        _store_output(acc, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om, HAS_BIAS)


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


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _arrival_counters(device: torch.device) -> torch.Tensor:
    """The split launches' counters on ``device``: zero between launches (each launch resets those it used)."""
    return torch.zeros(_MAX_ROW_BLOCKS_SPLIT, dtype=torch.int32, device=device)


@functools.cache
def choose_config(num_rows: int, n: int, k: int, num_sms: int) -> W4A16Config:
    """A launch shape for x [num_rows, k] times W [n, k] on a device of ``num_sms`` SMs.

    From the M = 1 sweep on an H200 (benchmarks/h200/issue16-w4a16): up to 16 rows, 128-row blocks of W with 8
    warps and a 3-deep pipeline, K split in up to 8 slices while the grid stays within ~8 programs per SM, won on
    each of Llama-3.1-8B's projections (down_proj 67.6 -> 48.0 us against 64-row blocks). 17..63 rows: x padded
    to 32 / 64 rows, 64-row blocks of W (the shape measured at 64 rows). More rows: 128 x 64/128 tiles (those
    sizes normally take the dequantize + cuBLAS path, ``DEQUANT_MIN_ROWS``).
    """
    if num_rows > 64:
        return W4A16Config(block_n=128, block_m=64 if num_rows <= 128 else 128, num_warps=8, num_stages=3)
    tiles = triton.cdiv(k, TILE_K)
    if num_rows <= 16:
        block_n, block_m, max_split, warps, stages = 128, 16, 8, 8, 3
    else:
        block_n, block_m, max_split, warps, stages = 64, triton.next_power_of_2(num_rows), 8, 4, 3
    row_blocks = triton.cdiv(n, block_n)
    wanted = max(1, min(max_split, triton.cdiv(8 * num_sms, row_blocks), tiles // 2))
    split_k = max(d for d in range(1, wanted + 1) if tiles % d == 0)  # equal slices where possible
    return W4A16Config(block_n=block_n, block_m=block_m, split_k=split_k, num_warps=warps, num_stages=stages)


def w4a16_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None,
                 config: W4A16Config | None = None, dequant_min_rows: int | None = None) -> torch.Tensor:
    """``x W^T + bias`` for x [..., K] (half precision on CUDA; float32 in the interpreter) and W in the canonical
    int4 layout; a new tensor [..., N] in x's dtype. ``config`` / ``dequant_min_rows`` override the choices
    (tests, tuning)."""
    n, k = weight.qweight.shape[0], weight.input_size
    x2d = x.reshape(-1, k)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    num_rows = x2d.shape[0]
    threshold = DEQUANT_MIN_ROWS if dequant_min_rows is None else dequant_min_rows
    if num_rows >= threshold:
        x_in = x2d if weight.perm is None else x2d.index_select(1, weight.perm)
        out = F.linear(x_in, dequantize_int4(weight, x.dtype), bias)
        return out.view(*x.shape[:-1], n)
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows:
        num_sms = _num_sms(x.device.index or 0) if x.is_cuda else 8
        _launch_gemm(x2d, weight, bias, out, config or choose_config(num_rows, n, k, num_sms))
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


def _launch_gemm(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, out: torch.Tensor,
                 config: W4A16Config) -> None:
    num_rows, k = x.shape
    n, padded_k = out.shape[1], weight.qweight.shape[1] * 8
    row_blocks = triton.cdiv(n, config.block_n)
    m_blocks = triton.cdiv(num_rows, config.block_m)
    k_per_split = triton.cdiv(triton.cdiv(padded_k, config.split_k), TILE_K) * TILE_K
    num_splits = triton.cdiv(padded_k, k_per_split)
    is_split = num_splits > 1 and m_blocks == 1 and row_blocks <= _MAX_ROW_BLOCKS_SPLIT
    if is_split:
        partials = torch.empty((num_splits, row_blocks * config.block_n, config.block_m), dtype=torch.float32,
                               device=x.device)
        arrivals = _arrival_counters(x.device)
    else:
        num_splits, k_per_split = 1, padded_k
        partials = arrivals = out  # placeholders, never touched
    zeros = weight.zeros if weight.zeros is not None else weight.scales  # placeholder when symmetric
    _w4a16_gemm_kernel[(row_blocks, m_blocks, num_splits)](
        x, weight.perm if weight.perm is not None else x, weight.qweight, weight.scales, zeros,
        bias if bias is not None else out, out, partials, arrivals,
        num_rows, n, k, padded_k, k_per_split, weight.group_size, weight.scales.shape[1], x.stride(0),
        weight.qweight.stride(0), weight.scales.stride(0), zeros.stride(0), out.stride(0),
        HAS_PERM=weight.perm is not None, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        IS_SPLIT=is_split, EVEN_K=k == padded_k, BLOCK_N=config.block_n, BLOCK_M=config.block_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
