"""Dot-free FP8 GEMV for the smallest batches: ``y[M, N] = x[M, K] @ (W_fp8[N, K] * s[N])^T (+ bias)``, M = 1..4.

At batch 1 a projection is one pass over its weight, so bytes are time: 1 byte per weight instead of bf16's 2
halves it, if the kernel streams at the memory's bandwidth. The ``tl.dot`` kernels did not (on an H200 at M = 1,
benchmarks/h200/issue16-fp8-weights): the W8A8 one paid a separate activation-quantization launch and a split-K
reduction per projection (1.4-2.0 TB/s on qkv, o and down), the weight-only one a conversion of the widened tile
into the dot's operand layout (1.4-2.3 TB/s).

Here nothing is padded to a dot tile and x is never quantized (weight only; x is ~0.1% of the bytes at this size).
Each program owns ``BLOCK_N`` weight rows and one K slice. Per step it loads a [BLOCK_N, BLOCK_K] FP8 tile (16-byte
vectors along K), widens it to float32 in registers, and for each x row adds ``tile * x_row`` elementwise into
that row's float32 accumulator [BLOCK_N, BLOCK_K]; the sum over K happens once, after the loop, then the
per-channel weight scale and the bias. Each x row is a separate accumulator, unrolled at compile time
(``NUM_ROWS``): one 2D layout for the weight tile and all of them, so nothing but x's row is ever re-laid out.

The loop is a ``tl.range`` with ``num_stages``: Triton software-pipelines a loop's loads (``NUM_STAGES - 1``
tiles in flight through shared memory) only when they feed a ``tl.dot`` or when the loop itself carries
``num_stages``. ``NUM_STAGES = 1`` leaves the latency to occupancy alone.

K is split only when the row blocks alone would leave SMs idle (``choose_config``; never for Llama-3.1-8B's
projections), finished as in ``fp8_triton`` (the last slice to arrive sums in split order: deterministic).

For one row of x the kernel can also compute its input as it loads it (``fp8_rms_norm_gemv``, ``fp8_silu_mul_gemv``):
the RMSNorm before qkv and gate_up (with the residual add) or SiLU-and-mul before down, which then need no launch of
their own. Unlike a ``tl.dot`` GEMM's prologue (``skinny_gemm``, where a computed x goes through shared memory and
stalls the weight pipeline), x here is a register vector anyway, broadcast over the weight tile. Measured slower all
the same (``fp8_gemm.FUSE_INPUT_INTO_GEMV``, off), so the model does not route to them. Rounding is the
skinny GEMM's: ``s = x + residual`` and ``s * norm_weight`` rounded to x's dtype, the row's 1 / rms applied to the
float32 product (one rounding step from torch's order); SiLU's output and ``silu * up`` rounded as torch rounds
them (the same input as the unfused ops).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedllm import pdl
from pagedllm.model.input_prologue import InputPrologue
from pagedllm.model.quantization.fp8_gemm import FP8_DTYPE
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig, accepts, finish_tile
from pagedllm.model.split_k import even_split, plan_launch, sm_count
from pagedllm.pdl import allow_later_kernels, wait_for_earlier_kernels

MAX_ROWS = 4  # one accumulator per x row, unrolled: the registers grow with the rows


@functools.cache
def choose_config(n: int, k: int, num_rows: int, num_sms: int) -> Fp8GemmConfig:
    """A launch shape: 512-wide K steps where K allows (a warp's 32 lanes each load 16 bytes of one row), a 4 KB
    weight tile per step for one x row and 2 KB for more (each row's float32 accumulator holds a tile: 32 registers
    a thread at 4 warps); K split only below two row blocks per SM. One row: a 4-deep pipeline, which summed a
    Llama-3.1-8B layer's four projections to 64.2 us against 65.2 at 3 deep on the H200 (the best swept shape per
    projection summed to 63.1; benchmarks/h200/session30, ``fp8_microbench.py --sweep gemv``); more rows: 3 deep."""
    block_k = min(512, max(16, triton.next_power_of_2(k)))
    tile = 4096 if num_rows == 1 else 2048
    block_n = min(64, max(1, tile // block_k))
    row_blocks = triton.cdiv(n, block_n)
    split_k = even_split(triton.cdiv(k, block_k), triton.cdiv(2 * num_sms, row_blocks), 2)
    return Fp8GemmConfig(block_n, block_k, split_k, num_warps=4, num_stages=4 if num_rows == 1 else 3)


@triton.jit
def _add_row_product(acc, w, x_ptr, row: tl.constexpr, cols, K, stride_xm, EVEN_K: tl.constexpr):
    """``acc + w * x[row, cols]`` (x broadcast over the tile's weight rows), in float32."""
    x_ptrs = x_ptr + row * stride_xm + cols
    if EVEN_K:
        x = tl.load(x_ptrs, eviction_policy="evict_last")
    else:
        x = tl.load(x_ptrs, mask=cols < K, other=0.0, eviction_policy="evict_last")
    return acc + w * x.to(tl.float32)[None, :]


@triton.jit
def _row_sums(acc0, acc1, acc2, acc3, NUM_ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The accumulators' sums over K side by side: column ``r`` of the [BLOCK_N, BLOCK_M] result is x row ``r``'s
    (BLOCK_M: NUM_ROWS rounded up to 1, 2 or 4; columns past NUM_ROWS are zero)."""
    column = tl.arange(0, BLOCK_M)[None, :]
    sums = tl.where(column == 0, tl.sum(acc0, axis=1)[:, None], 0.0)
    if NUM_ROWS > 1:
        sums = tl.where(column == 1, tl.sum(acc1, axis=1)[:, None], sums)
    if NUM_ROWS > 2:
        sums = tl.where(column == 2, tl.sum(acc2, axis=1)[:, None], sums)
    if NUM_ROWS > 3:
        sums = tl.where(column == 3, tl.sum(acc3, axis=1)[:, None], sums)
    return sums


@triton.jit
def _load_vector(ptr, cols, K, EVEN_K: tl.constexpr):
    """``ptr[cols]``, zero past K; kept in L2 (every program of the launch reads it)."""
    if EVEN_K:
        return tl.load(ptr + cols, eviction_policy="evict_last")
    return tl.load(ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last")


@triton.jit
def _fused_input(x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, cols, K, sum_squares, store_residual,
                 EVEN_K: tl.constexpr, NORM_INPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """x's one row at ``cols`` as the fused prologue computes it, in float32, and ``sum_squares`` [BLOCK_K] plus
    these columns' squares (NORM_INPUT). NORM_INPUT: ``s = x + residual`` (rounded; stored to ``residual_out`` where
    ``store_residual``), then ``s * norm_weight`` rounded. Otherwise SiLU-and-mul of x's halves [gate | up]."""
    x = _load_vector(x_ptr, cols, K, EVEN_K)
    if NORM_INPUT:
        if HAS_RESIDUAL:
            residual = _load_vector(residual_ptr, cols, K, EVEN_K)
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
            if store_residual:
                tl.store(residual_out_ptr + cols, x, mask=cols < K)
        x32 = x.to(tl.float32)
        sum_squares += x32 * x32
        norm_weight = _load_vector(norm_weight_ptr, cols, K, EVEN_K).to(tl.float32)
        return (x32 * norm_weight).to(x.dtype).to(tl.float32), sum_squares
    up = _load_vector(x_ptr + K, cols, K, EVEN_K).to(tl.float32)
    gate = x.to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x.dtype).to(tl.float32)  # torch rounds F.silu's output first
    return (silu * up).to(x.dtype).to(tl.float32), sum_squares


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, residual_ptr, norm_weight_ptr,
    residual_out_ptr, N, K, k_per_split, stride_xm, stride_wn, stride_om, eps,
    NUM_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    NORM_INPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL_INPUT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (row block, K slice): rows ``offs_n`` of W times every x row over its slice, then ``finish_tile``.
    With NORM_INPUT (never split: each program sees the whole row) the product is scaled by the row's 1 / rms."""
    wait_for_earlier_kernels(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * k_per_split + tl.arange(0, BLOCK_K)
    # Rows past N re-read row N - 1: the weight stream needs no row mask, and those results are never stored.
    w_ptrs = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn + cols[None, :]
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sum_squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    store_residual = tl.program_id(0) == 0  # one program writes the new residual stream
    for _ in tl.range(0, k_per_split, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first").to(tl.float32)
        else:
            w = tl.load(w_ptrs, mask=cols[None, :] < K, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if NORM_INPUT or SILU_MUL_INPUT:  # one row (the wrappers check)
            x, sum_squares = _fused_input(x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, cols, K,
                                          sum_squares, store_residual, EVEN_K, NORM_INPUT, HAS_RESIDUAL)
            acc0 += w * x[None, :]
        else:
            acc0 = _add_row_product(acc0, w, x_ptr, 0, cols, K, stride_xm, EVEN_K)
            if NUM_ROWS > 1:
                acc1 = _add_row_product(acc1, w, x_ptr, 1, cols, K, stride_xm, EVEN_K)
            if NUM_ROWS > 2:
                acc2 = _add_row_product(acc2, w, x_ptr, 2, cols, K, stride_xm, EVEN_K)
            if NUM_ROWS > 3:
                acc3 = _add_row_product(acc3, w, x_ptr, 3, cols, K, stride_xm, EVEN_K)
        w_ptrs += BLOCK_K
        cols += BLOCK_K
    allow_later_kernels(USE_PDL)
    sums = _row_sums(acc0, acc1, acc2, acc3, NUM_ROWS, BLOCK_M)
    if NORM_INPUT:
        sums = sums * tl.rsqrt(tl.sum(sum_squares, axis=0) / K + eps)
    finish_tile(sums, offs_n, tl.arange(0, BLOCK_M), scale_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr,
                arrivals_ptr, NUM_ROWS, N, stride_om, HAS_BIAS, False, IS_SPLIT, BLOCK_N, BLOCK_M)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """``x (weight * scale[:, None])^T + bias`` for x [1..MAX_ROWS, K] (16 or 32 bits, never quantized), weight fp8
    [N, K], scale float32 [N] (a per-tensor scale expanded to [N]); a new tensor [M, N] in x's dtype. ``config``
    overrides the launch shape (tests, tuning)."""
    num_rows = x.shape[0]
    if not accepts(x, weight) or not 0 < num_rows <= MAX_ROWS:
        raise ValueError(f"fp8_gemv needs x [1..{MAX_ROWS} rows, K] with a unit inner stride and a contiguous FP8 "
                         f"weight [N, K]; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}")
    return _launch(x, weight, scale, bias, config, InputPrologue())


def fp8_rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                      config: Fp8GemmConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_gemv(rms_norm(x + residual) * norm_weight, ...)`` and ``x + residual`` (the next residual stream) for
    one row x [1, K], in one launch; without ``residual``, of ``x`` alone, and the second result is ``x`` itself
    (module docstring: rounding)."""
    _check_one_row(x, weight, x.shape[-1])
    new_residual = torch.empty_like(x) if residual is not None else x
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"fp8_rms_norm_gemv needs a residual shaped as x {tuple(x.shape)}; got "
                         f"{tuple(residual.shape)}")
    prologue = InputPrologue(residual, norm_weight, eps, new_residual if residual is not None else None)
    return _launch(x, weight, scale, bias, config, prologue), new_residual


def fp8_silu_mul_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                      config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """``fp8_gemv(silu(x[:, :K]) * x[:, K:], ...)`` for one row x [1, 2 * K] (a fused gate/up projection's output)
    and weight [N, K], in one launch."""
    _check_one_row(x, weight, 2 * weight.shape[1])
    return _launch(x, weight, scale, bias, config, InputPrologue(is_silu_mul=True))


def _check_one_row(x: torch.Tensor, weight: torch.Tensor, width: int) -> None:
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != width or not x.is_contiguous() \
            or weight.dtype != FP8_DTYPE or not weight.is_contiguous():
        raise ValueError(f"The fused FP8 GEMVs need one contiguous row x [1, {width}] and a contiguous FP8 weight; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)} {weight.dtype}")


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
            config: Fp8GemmConfig | None, prologue: InputPrologue) -> torch.Tensor:
    num_rows, (n, k) = x.shape[0], weight.shape
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    config = config or choose_config(n, k, num_rows, sm_count(x.device))
    block_m = triton.next_power_of_2(num_rows)
    # The norm needs whole rows: K is not split then.
    launch = plan_launch(n, k, out, block_n=config.block_n, block_k=config.block_k, block_m=block_m,
                         split_k=config.split_k, can_split=not prologue.is_norm)
    residual = prologue.residual if prologue.residual is not None else x  # placeholders when unused
    _fp8_gemv_kernel[launch.grid](
        x, weight, scale, bias if bias is not None else out, out, launch.partials, launch.arrivals, residual,
        prologue.norm_weight if prologue.is_norm else x,
        prologue.residual_out if prologue.residual_out is not None else x,
        n, k, launch.k_per_split, x.stride(0), weight.stride(0), out.stride(0), prologue.eps, NUM_ROWS=num_rows,
        HAS_BIAS=bias is not None, IS_SPLIT=launch.is_split, EVEN_K=launch.even_k, BLOCK_N=config.block_n,
        BLOCK_M=block_m, BLOCK_K=config.block_k, NUM_STAGES=config.num_stages, NORM_INPUT=prologue.is_norm,
        HAS_RESIDUAL=prologue.residual is not None, SILU_MUL_INPUT=prologue.is_silu_mul,
        num_warps=config.num_warps, **pdl.launch_options(x.device),
    )
    return out
