"""Skinny GEMM for decode-sized inputs: ``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)`` with few rows (M <= 16).

At batch 1..16 a linear layer is one pass over its weight, so its time is the weight's bytes over the memory
bandwidth plus a fixed cost per launch. Measured on an H200 inside a CUDA graph (benchmarks/h200/
issue14-decode-kernels): Qwen3-0.6B's four projections take 4.3-5.3 us here against 4.8-12.7 us in cuBLAS (its
o_proj, 4.2 MB, ran at 0.33 TB/s at batch 1), Llama-3.1-8B's qkv and o run 7% and 14% faster, gate_up and down
within 1% of cuBLAS, and both LM heads stream at 4.4-4.5 TB/s, 3-5% faster than cuBLAS.

Here each program owns ``BLOCK_N`` rows of W and one slice of K, and computes the transposed product
``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T`` with ``tl.dot``: x's rows are padded to 16 (tl.dot's minimum), work
the tensor cores do for free while memory is the bound, and the weight loads feed a dot so Triton pipelines them
``num_stages`` deep (many bytes in flight per SM is what reaches full bandwidth).

When W has too few row blocks to give every SM work (N = 1024 with K = 3072, say), K is split as well: each
program writes its float32 partial, and the last program of a row block to arrive (an atomic counter per row block)
sums the partials in split order, adds the bias, writes the output and resets its counter. That is one launch, no
memset, and deterministic (the sum order never depends on which program finished first).

The op before a projection can ride in the kernel's input prologue, saving its launch: ``rms_norm_gemm`` adds
the residual and RMS-normalizes each row as it loads x (the row's 1 / rms, summed over the K loop, scales the
float32 product at the end; one program writes the new residual), and ``silu_mul_gemm`` computes
``silu(gate) * up`` from a fused gate/up output as it loads it. Both are exact up to a rounding step and tested,
but the model does not route to them (``layers.FUSE_NORM_AND_ACTIVATION_INTO_GEMM``): on an H200 they made the
Qwen3-0.6B decode step 17% slower (benchmarks/h200/issue14-decode-fusions). In the 64-row configs Triton feeds the
dot's x operand to wgmma from shared memory, so a computed x is stored there every K step and each step then
waits for its own MMA and an unpipelined norm-weight load: the weight stream stops being pipelined.

The op after a projection can ride in its epilogue instead: ``gemm_add_rms_norm`` adds the residual to each output
tile (the next residual stream) and the last row block to finish (a second counter) RMS-normalizes the whole rows,
which keeps the K loop as it is. Off in the model until measured (``layers.FUSE_NORM_INTO_OUTPUT``).

Allocation per call is a fixed-size output (and partials buffer when split) and nothing is read back to the host,
so calls can be captured in a CUDA graph. The counters and the launch planning are ``split_k``'s, shared with the
other decode GEMMs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm import pdl
from pagedllm.model.input_prologue import InputPrologue
from pagedllm.model.split_k import even_split, plan_launch, sm_count
from pagedllm.pdl import allow_later_kernels, wait_for_earlier_kernels

MAX_ROWS = 16  # decode batches up to this many rows take this kernel
_BLOCK_M = 16  # tl.dot's smallest tile side: x's rows are padded to it


@dataclass(frozen=True)
class SkinnyGemmConfig:
    """Launch shape: rows of W per program, K per loop step, K slices, warps and pipeline depth."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _store_output(acc, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om, HAS_BIAS: tl.constexpr):
    """Add the bias and write ``acc`` [BLOCK_N, BLOCK_M] (transposed) into ``out`` [num_rows, N]."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < num_rows)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_weight_tile(w_ptrs, offs_k, K, EVEN_K: tl.constexpr):
    """W[rows, offs_k] as [BLOCK_N, BLOCK_K]; columns past K read as zero."""
    if EVEN_K:
        return tl.load(w_ptrs)
    return tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0.0)


@triton.jit
def _input_tile(
    x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, offs_k, offs_m, sum_squares, num_rows, K,
    stride_xm, stride_rm, num_residual_rows, DTYPE: tl.constexpr,
    EVEN_K: tl.constexpr, NORM_INPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL_INPUT: tl.constexpr,
):
    """The GEMM's input at columns ``offs_k``, transposed ([BLOCK_K, BLOCK_M] in ``DTYPE``), after the fused
    prologue; and ``sum_squares`` [BLOCK_K, BLOCK_M] plus these columns' squares (NORM_INPUT; summed over K only
    after the loop, so each step adds no cross-thread reduction).

    NORM_INPUT: ``s = x + residual`` (rounded, as torch adds), written to ``residual_out`` by one program, and
    ``s * norm_weight`` (rounded) is the input; the row's 1 / rms is applied to the product in the epilogue. Only
    the first row block's program writes ``s`` (``num_residual_rows`` is 0 in the others).
    SILU_MUL_INPUT: ``silu(x[:, k]) * x[:, K + k]``, rounded where torch rounds.
    """
    rows = offs_m[None, :].to(tl.int64)
    cols = offs_k[:, None]
    mask = rows < num_rows
    if not EVEN_K:
        mask = mask & (cols < K)
    x = tl.load(x_ptr + rows * stride_xm + cols, mask=mask, other=0.0)
    if NORM_INPUT:
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + rows * stride_rm + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(DTYPE)
            write_mask = rows < num_residual_rows
            if not EVEN_K:
                write_mask = write_mask & (cols < K)
            tl.store(residual_out_ptr + rows * K + cols, x, mask=write_mask)
        x32 = x.to(tl.float32)
        sum_squares += x32 * x32
        norm_weight = tl.load(norm_weight_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        x = (x32 * norm_weight[:, None]).to(DTYPE)
    elif SILU_MUL_INPUT:
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + rows * stride_xm + K + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)  # torch rounds F.silu's output first
        x = (silu * up).to(DTYPE)
    return x.to(DTYPE), sum_squares


@triton.jit
def _partial_product(
    x_ptr, w_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, offs_n, offs_m, k_start, num_rows, N, K,
    k_per_split, stride_xm, stride_wn, stride_rm, num_residual_rows,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NORM_INPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SILU_MUL_INPUT: tl.constexpr,
):
    """``W[offs_n, k_start : k_start + k_per_split] @ input[:, same]^T`` as float32 [BLOCK_N, BLOCK_M], and each
    input row's sum of squares over those columns ([BLOCK_M]; zero unless NORM_INPUT)."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # Rows past N re-read row N - 1: the weight stream needs no row mask, and those results are never stored.
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + offs_k[None, :]
    dtype = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    sum_squares = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        w = _load_weight_tile(w_ptrs, offs_k + k, K, EVEN_K)
        x, sum_squares = _input_tile(x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, offs_k + k, offs_m,
                                     sum_squares, num_rows, K, stride_xm, stride_rm, num_residual_rows, dtype,
                                     EVEN_K, NORM_INPUT, HAS_RESIDUAL, SILU_MUL_INPUT)
        acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K
    return acc, tl.sum(sum_squares, axis=0)


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr,
    done_ptr, num_rows, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_rm, eps,
    HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NORM_INPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL_INPUT: tl.constexpr,
    NORM_OUTPUT: tl.constexpr, NORM_BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (row block, K slice): one partial product; with IS_SPLIT the last slice to arrive sums them all.
    With NORM_INPUT (never split: each program sees whole rows) the product is scaled by each row's 1 / rms.
    With NORM_OUTPUT the output tiles plus the residual go to ``residual_out`` and the last row block to finish
    RMS-normalizes those whole rows into ``out`` (``_norm_rows_when_last``)."""
    wait_for_earlier_kernels(USE_PDL)
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc, sum_squares = _partial_product(
        x_ptr, w_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, offs_n, offs_m, split * k_per_split,
        num_rows, N, K, k_per_split, stride_xm, stride_wn, stride_rm, tl.where(row_block == 0, num_rows, 0),
        BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K, DOT_PRECISION, NORM_INPUT, HAS_RESIDUAL, SILU_MUL_INPUT,
    )
    allow_later_kernels(USE_PDL)
    if NORM_INPUT:
        acc = acc * tl.rsqrt(sum_squares / K + eps)[None, :]
    if IS_SPLIT:
        num_splits = tl.num_programs(1)
        # partials [num_splits, row blocks * BLOCK_N, BLOCK_M]: padded rows, so no masks.
        tile = offs_n[:, None] * BLOCK_M + offs_m[None, :]
        split_stride = tl.num_programs(0) * BLOCK_N * BLOCK_M
        tl.store(partial_ptr + split * split_stride + tile, acc)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(arrivals_ptr + row_block, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(0, num_splits):  # fixed order: the same sum whichever slice came last
                total += tl.load(partial_ptr + s * split_stride + tile, cache_modifier=".cg")
            tl.store(arrivals_ptr + row_block, 0)  # ready for the next launch (or graph replay)
            _finish_tile(total, bias_ptr, out_ptr, residual_ptr, residual_out_ptr, norm_weight_ptr, done_ptr,
                         offs_n, offs_m, num_rows, N, stride_om, stride_rm, eps, HAS_BIAS, NORM_OUTPUT, NORM_BLOCK)
    else:
        _finish_tile(acc, bias_ptr, out_ptr, residual_ptr, residual_out_ptr, norm_weight_ptr, done_ptr, offs_n,
                     offs_m, num_rows, N, stride_om, stride_rm, eps, HAS_BIAS, NORM_OUTPUT, NORM_BLOCK)


@triton.jit
def _finish_tile(acc, bias_ptr, out_ptr, residual_ptr, residual_out_ptr, norm_weight_ptr, done_ptr, offs_n, offs_m,
                 num_rows, N, stride_om, stride_rm, eps,
                 HAS_BIAS: tl.constexpr, NORM_OUTPUT: tl.constexpr, NORM_BLOCK: tl.constexpr):
    """Write a row block's finished product: into ``out``, or with NORM_OUTPUT as the residual sum, normalized by
    the last row block to finish."""
    if NORM_OUTPUT:
        _store_residual_sum(acc, bias_ptr, residual_ptr, residual_out_ptr, offs_n, offs_m, num_rows, N, stride_rm,
                            HAS_BIAS)
        _norm_rows_when_last(residual_out_ptr, norm_weight_ptr, out_ptr, done_ptr, num_rows, N, stride_om, eps,
                             NORM_BLOCK)
    else:
        _store_output(acc, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om, HAS_BIAS)


@triton.jit
def _store_residual_sum(acc, bias_ptr, residual_ptr, residual_out_ptr, offs_n, offs_m, num_rows, N, stride_rm,
                        HAS_BIAS: tl.constexpr):
    """``residual_out = linear output + residual`` for this tile, both rounded where torch rounds (the projection's
    output, then the sum: the RMSNorm's residual add in the activation dtype)."""
    dtype = residual_out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    rows = offs_m[None, :].to(tl.int64)
    mask = (offs_n[:, None] < N) & (rows < num_rows)
    residual = tl.load(residual_ptr + rows * stride_rm + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
    total = (acc.to(dtype).to(tl.float32) + residual).to(dtype)
    tl.store(residual_out_ptr + rows * N + offs_n[:, None], total, mask=mask)


@triton.jit
def _norm_rows_when_last(sum_ptr, norm_weight_ptr, out_ptr, done_ptr, num_rows, N, stride_om, eps,
                         NORM_BLOCK: tl.constexpr):
    """Count this row block as done; the last one RMS-normalizes the whole rows of ``sum`` [num_rows, N] (times
    the norm weight, rounded as ``triton_ops._rms_norm_kernel`` rounds) into ``out`` and resets the counter."""
    tl.debug_barrier()  # every thread's tile is written before the counter says so
    finished = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == tl.num_programs(0) - 1:
        dtype = out_ptr.dtype.element_ty
        cols = tl.arange(0, NORM_BLOCK)
        for row in range(0, num_rows):
            row_ptr = sum_ptr + row * N  # at most 16 rows of N: no int32 overflow
            sum_squares = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
            for start in range(0, N, NORM_BLOCK):
                x = tl.load(row_ptr + start + cols, mask=start + cols < N, other=0.0, cache_modifier=".cg")
                sum_squares += x.to(tl.float32) * x.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(sum_squares, axis=0) / N + eps)
            for start in range(0, N, NORM_BLOCK):
                mask = start + cols < N
                x = tl.load(row_ptr + start + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                weight = tl.load(norm_weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                normed = (x * rstd).to(dtype).to(tl.float32) * weight
                tl.store(out_ptr + row * stride_om + start + cols, normed.to(dtype), mask=mask)
        tl.store(done_ptr, 0)  # ready for the next launch (or graph replay)


@functools.cache
def choose_config(n: int, k: int, num_sms: int, element_size: int = 2) -> SkinnyGemmConfig:
    """A launch shape for W [n, k] (elements of ``element_size`` bytes) on a device of ``num_sms`` SMs.

    From a sweep on an H200 (benchmarks/h200/issue14-decode-kernels), M = 1 and 16 alike: with at least a quarter
    as many 64-row blocks as SMs, no split and a 6-deep pipeline won (4 deep once the blocks are many waves, as
    for an LM head); below that (N = 1024) 32-row blocks with K split to about one program per SM, each slice
    at least 4 K steps long, came within ~5% of the best of every swept shape.
    """
    block_k = 128 if k >= 128 else max(16, triton.next_power_of_2(k))
    row_blocks = triton.cdiv(n, 64)
    max_stages = 6 if element_size <= 2 else 3  # float32 tiles are twice the shared memory
    if 4 * row_blocks >= num_sms:
        return SkinnyGemmConfig(64, block_k, 1, num_stages=min(max_stages, 6 if row_blocks <= 2 * num_sms else 4))
    k_steps = triton.cdiv(k, block_k)
    split_k = even_split(k_steps, triton.cdiv(num_sms, triton.cdiv(n, 32)), 4)
    return SkinnyGemmConfig(32, block_k, split_k, num_stages=min(max_stages, 4))


def accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``skinny_gemm(x, weight)`` serves this call: a half-precision x of 1 to
    ``MAX_ROWS`` rows with a unit inner stride, and a contiguous weight of the same dtype."""
    k = x.shape[-1]
    return (0 < x.numel() <= MAX_ROWS * k and x.dtype in (torch.float16, torch.bfloat16) and x.stride(-1) == 1
            and weight.dtype == x.dtype and weight.is_contiguous() and weight.shape[1] == k)


def skinny_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SkinnyGemmConfig | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., K] of at most ``MAX_ROWS`` rows and a contiguous weight [N, K]
    of x's dtype; a new tensor [..., N]. ``config`` overrides the launch shape (tests, tuning)."""
    x2d = _rows(x, weight, x.shape[-1])
    out = _run(x2d, weight, bias, config, InputPrologue())
    return out.view(*x.shape[:-1], weight.shape[0])


def rms_norm_gemm(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None = None, config: SkinnyGemmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.linear(rms_norm(x + residual) * norm_weight, weight, bias)`` and ``x + residual`` (the next residual
    stream) in one launch; without ``residual``, of ``x`` alone, and the second result is ``x`` itself.

    Same rounding as the torch RMSNorm up to one step: torch rounds the normalized row before multiplying by
    ``norm_weight``, here ``x * norm_weight`` is rounded and the row's 1 / rms scales the float32 product.
    """
    k = x.shape[-1]
    x2d = _rows(x, weight, k)
    residual2d = _rows(residual, weight, k) if residual is not None else x2d
    new_residual = torch.empty_like(x2d, memory_format=torch.contiguous_format) if residual is not None else x2d
    prologue = InputPrologue(residual=residual2d if residual is not None else None, norm_weight=norm_weight, eps=eps,
                         residual_out=new_residual)
    out = _run(x2d, weight, bias, config, prologue)
    return out.view(*x.shape[:-1], weight.shape[0]), (new_residual.view(x.shape) if residual is not None else x)


def silu_mul_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SkinnyGemmConfig | None = None
) -> torch.Tensor:
    """``F.linear(silu(x[..., :K]) * x[..., K:], weight, bias)`` for x [..., 2 * K] (a fused gate/up projection's
    output) and weight [N, K], in one launch: the activation is computed as the GEMM loads its input."""
    k = weight.shape[1]
    if x.shape[-1] != 2 * k:
        raise ValueError(f"silu_mul_gemm needs x [..., 2 * K] for a weight [N, K]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    x2d = _rows(x, weight, 2 * k)
    out = _run(x2d, weight, bias, config, InputPrologue(is_silu_mul=True))
    return out.view(*x.shape[:-1], weight.shape[0])


def gemm_add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
    norm_weight: torch.Tensor, eps: float, config: SkinnyGemmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm(F.linear(x, weight, bias) + residual) * norm_weight`` and the sum itself (the next residual
    stream), in one launch: each row block writes its slice of the sum, and the last one to finish normalizes the
    whole rows (a decoder layer's o or down projection and the RMSNorm after it). Rounded as the separate
    ``linear`` and ``fused_add_rms_norm`` round."""
    x2d = _rows(x, weight, x.shape[-1])
    n = weight.shape[0]
    residual2d = residual.reshape(-1, n)
    if residual2d.shape[0] != x2d.shape[0] or residual2d.stride(-1) != 1 or residual.dtype != x.dtype:
        raise ValueError(f"gemm_add_rms_norm needs a residual [{x2d.shape[0]}, {n}] of x's dtype with a unit inner "
                         f"stride; got {tuple(residual.shape)} {residual.dtype} strides {residual.stride()}")
    new_residual = torch.empty((x2d.shape[0], n), dtype=x.dtype, device=x.device)
    norm = OutputNorm(residual2d, norm_weight, eps, new_residual)
    out = _run(x2d, weight, bias, config, InputPrologue(), norm)
    return out.view(*x.shape[:-1], n), new_residual.view(*x.shape[:-1], n)


@dataclass(frozen=True)
class OutputNorm:
    """The residual add and RMSNorm after the GEMM (``gemm_add_rms_norm``)."""

    residual: torch.Tensor  # [rows, N]
    norm_weight: torch.Tensor  # [N]
    eps: float
    residual_out: torch.Tensor  # [rows, N]: residual + the GEMM's output


@functools.cache
def _rows_done_counter(device: torch.device) -> torch.Tensor:
    """``gemm_add_rms_norm``'s count of finished row blocks on ``device``: zero between launches (the last row
    block resets it), so one serves every launch on the stream and every graph replay."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _rows(x: torch.Tensor, weight: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as [rows, width] with a unit inner stride, checked against the kernel's limits."""
    x2d = x.reshape(-1, x.shape[-1])
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    if x2d.shape[0] > MAX_ROWS or x2d.shape[1] != width or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"skinny_gemm needs x [<= {MAX_ROWS} rows, K] and a contiguous weight [N, K]; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)} strides {weight.stride()}")
    return x2d


def _run(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: SkinnyGemmConfig | None,
    prologue: InputPrologue, norm: OutputNorm | None = None,
) -> torch.Tensor:
    num_rows, (n, k) = x.shape[0], weight.shape
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows:
        config = config or choose_config(n, k, sm_count(x.device), x.element_size())
        _launch(x, weight, bias, out, config, prologue, norm)
    return out


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, config: SkinnyGemmConfig,
    prologue: InputPrologue, norm: OutputNorm | None,
) -> None:
    num_rows, (n, k) = x.shape[0], weight.shape
    # The norm needs whole rows: K is not split then.
    launch = plan_launch(n, k, out, block_n=config.block_n, block_k=config.block_k, block_m=_BLOCK_M,
                         split_k=config.split_k, can_split=not prologue.is_norm)
    residual, norm_weight, residual_out, eps = _side_tensors(x, prologue, norm)
    _skinny_gemm_kernel[launch.grid](
        x, weight, bias if bias is not None else out, out, launch.partials, launch.arrivals, residual, norm_weight,
        residual_out, _rows_done_counter(x.device) if norm is not None else x,
        num_rows, n, k, launch.k_per_split, x.stride(0), weight.stride(0), out.stride(0), residual.stride(0),
        eps, HAS_BIAS=bias is not None, IS_SPLIT=launch.is_split, EVEN_K=launch.even_k,
        BLOCK_N=config.block_n, BLOCK_M=_BLOCK_M, BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        NORM_INPUT=prologue.is_norm, HAS_RESIDUAL=prologue.residual is not None, SILU_MUL_INPUT=prologue.is_silu_mul,
        NORM_OUTPUT=norm is not None, NORM_BLOCK=min(1024, triton.next_power_of_2(n)),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_options(x.device),
    )


def _side_tensors(x: torch.Tensor, prologue: InputPrologue, norm: OutputNorm | None) -> tuple:
    """(residual, norm weight, residual out, eps) for the kernel: the input prologue's, the output norm's, or x
    as unread placeholders."""
    if norm is not None:
        return norm.residual, norm.norm_weight, norm.residual_out, norm.eps
    residual = prologue.residual if prologue.residual is not None else x
    return (residual, prologue.norm_weight if prologue.is_norm else x,
            prologue.residual_out if prologue.residual_out is not None else x, prologue.eps)
