"""Triton kernels of the FP8 linear layers (CUDA; the tests also run them in Triton's interpreter on CPU).

``fp8_skinny_gemm``: ``y[M, N] = x[M, K] @ (W_fp8[N, K] * s[N])^T (+ bias)`` for decode-sized x (M <= 16), weight
only: at batch 1..16 a projection is one pass over its weight, so streaming 1 byte per weight instead of 2 is the
whole gain; x stays in 16 bits. Same plan as the bf16 skinny GEMM (``model/skinny_gemm.py``): each program owns
``BLOCK_N`` weight rows and one K slice and computes ``acc[BLOCK_N, 16] = W_tile @ x_tile^T`` with ``tl.dot``
(x's rows padded to 16, free while memory is the bound), the FP8 tile widened to x's dtype in registers, the
per-channel scale applied once to the float32 result. FP8 rows are half the bytes, so fewer rows give the SMs
enough work: K is split whenever the row blocks alone would leave SMs idle; the last slice of a row block to arrive
(an atomic counter, shared with the bf16 kernel) sums the float32 partials in split order: deterministic, one
launch, no memset.

``fp8_w8a8_gemm``: the same kernel fed an FP8 x (quantized per row first, ``quantize_activation``) for up to 64
rows: the dot then multiplies FP8 by FP8 straight from shared memory, as the bf16 kernel does with bf16, with
nothing widened in registers (on an H200 the widening kept the weight-only kernel at 1.4-2.2 TB/s,
benchmarks/h200/issue16-fp8-weights), and both scales are applied in the epilogue.

``quantize_activation``: x [M, K] -> FP8 with a scale per row (dynamic: its max / 448) or one given scale, in one
launch instead of torch's four (abs, amax, divide, cast), ahead of ``torch._scaled_mm``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.model.quantization.fp8_gemm import _MIN_SCALE, FP8_DTYPE, FP8_MAX, ActivationScheme
from pagedllm.model.skinny_gemm import _MAX_ROW_BLOCKS_SPLIT, _arrival_counters, _num_sms

MAX_ROWS = 16  # decode batches up to this many rows take the weight-only skinny kernel
MAX_ROWS_W8A8 = 64  # and up to this many the W8A8 one
_BLOCK_M = 16  # tl.dot's smallest tile side: x's rows are padded to it


@dataclass(frozen=True)
class Fp8GemmConfig:
    """Launch shape: weight rows per program, K per loop step, K slices, warps, pipeline depth."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@functools.cache
def choose_config(n: int, k: int, num_sms: int) -> Fp8GemmConfig:
    """A launch shape for an FP8 weight [n, k]: 64-row blocks, 128-wide K steps; K split into equal whole-step
    slices (each at least 4 steps long) until there are about four programs per SM (on an H200 the weight-only
    kernel ran fastest with the most slices swept, 4, on all of Llama-3.1-8B's projections)."""
    block_k = 128 if k >= 128 else max(32, triton.next_power_of_2(k))
    row_blocks = triton.cdiv(n, 64)
    k_steps = triton.cdiv(k, block_k)
    wanted = max(1, min(triton.cdiv(4 * num_sms, row_blocks), k_steps // 4))
    split_k = max(d for d in range(1, wanted + 1) if k_steps % d == 0)
    return Fp8GemmConfig(64, block_k, split_k)


@triton.jit
def _store_output(acc, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om,
                  HAS_BIAS: tl.constexpr, HAS_X_SCALE: tl.constexpr):
    """Scale each output channel (and each row, for an FP8 x), add the bias, write ``acc`` [BLOCK_N, BLOCK_M]
    (transposed) to out [rows, N]."""
    acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    if HAS_X_SCALE:
        acc = acc * tl.load(x_scale_ptr + offs_m, mask=offs_m < num_rows, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < num_rows)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _partial_product(x_ptr, w_ptr, offs_n, offs_m, k_start, num_rows, N, K, k_per_split, stride_xm, stride_wn,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """``W[offs_n, k_start : k_start + k_per_split] @ x[:, same]^T`` as float32 [BLOCK_N, BLOCK_M], unscaled. The
    weight tile is widened to x's dtype (a no-op when x is FP8 too)."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # Rows past N re-read row N - 1: the weight stream needs no row mask, and those results are never stored.
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    x_rows = offs_m[None, :] < num_rows
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=x_rows, other=0.0)
        else:
            in_k = (offs_k + k) < K
            w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=x_rows & in_k[:, None], other=0.0)
        acc = tl.dot(w.to(dtype), x, acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return acc


@triton.jit(do_not_specialize=["num_rows"])
def _fp8_skinny_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, num_rows, N, K,
    k_per_split, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, HAS_X_SCALE: tl.constexpr, IS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (row block, K slice): one partial product; with IS_SPLIT the last slice to arrive sums them all."""
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc = _partial_product(x_ptr, w_ptr, offs_n, offs_m, split * k_per_split, num_rows, N, K, k_per_split,
                           stride_xm, stride_wn, BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K, DOT_PRECISION)
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
            _store_output(total, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om,
                          HAS_BIAS, HAS_X_SCALE)
            tl.store(arrivals_ptr + row_block, 0)  # ready for the next launch (or graph replay)
    else:
        _store_output(acc, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om,
                      HAS_BIAS, HAS_X_SCALE)


def skinny_accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``fp8_skinny_gemm`` serves x [M, K]: 1 to MAX_ROWS rows with a unit inner stride, and a contiguous
    FP8 weight [N, K]."""
    return (0 < x.shape[0] <= MAX_ROWS and x.stride(-1) == 1 and weight.dtype == FP8_DTYPE
            and weight.is_contiguous() and weight.shape[1] == x.shape[1]
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def fp8_skinny_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """``x (weight * scale[:, None])^T + bias`` for x [M <= 16, K], weight fp8 [N, K], scale float32 [N]; a new
    tensor [M, N] in x's dtype. ``config`` overrides the launch shape (tests, tuning)."""
    if not skinny_accepts(x, weight):
        raise ValueError(f"fp8_skinny_gemm needs x [<= {MAX_ROWS} rows, K] and a contiguous FP8 weight [N, K]; got "
                         f"x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _launch(x, None, weight, scale, bias, out, _BLOCK_M, config)
    return out


def w8a8_accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``fp8_w8a8_gemm`` serves x [M, K]: 1 to MAX_ROWS_W8A8 rows, a contiguous FP8 weight [N, K]."""
    return (0 < x.shape[0] <= MAX_ROWS_W8A8 and weight.dtype == FP8_DTYPE and weight.is_contiguous()
            and weight.shape[1] == x.shape[1] and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def fp8_w8a8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  scheme: ActivationScheme, input_scale: torch.Tensor | None = None,
                  config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """W8A8 for x [M <= 64, K]: x quantized per row (``scheme``), FP8 x FP8 dot, both scales in the epilogue; a
    new tensor [M, N] in x's dtype."""
    if not w8a8_accepts(x, weight):
        raise ValueError(f"fp8_w8a8_gemm needs x [<= {MAX_ROWS_W8A8} rows, K] and a contiguous FP8 weight [N, K]; "
                         f"got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    x_fp8, x_scale = quantize_activation(x, scheme, input_scale)
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    block_m = max(_BLOCK_M, triton.next_power_of_2(x.shape[0]))
    _launch(x_fp8, x_scale, weight, scale, bias, out, block_m, config)
    return out


def _launch(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None, out: torch.Tensor, block_m: int, config: Fp8GemmConfig | None) -> None:
    num_rows, (n, k) = x.shape[0], weight.shape
    num_sms = _num_sms(x.device.index or 0) if x.is_cuda else 8
    config = config or choose_config(n, k, num_sms)
    row_blocks = triton.cdiv(n, config.block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    num_splits = triton.cdiv(k, k_per_split)
    is_split = num_splits > 1 and row_blocks <= _MAX_ROW_BLOCKS_SPLIT
    if is_split:
        partials = torch.empty((num_splits, row_blocks * config.block_n, block_m), dtype=torch.float32,
                               device=x.device)
        arrivals = _arrival_counters(x.device)
    else:
        num_splits, k_per_split = 1, triton.cdiv(k, config.block_k) * config.block_k
        partials = arrivals = out  # placeholders, never touched
    _fp8_skinny_gemm_kernel[(row_blocks, num_splits)](
        x, weight, scale, x_scale if x_scale is not None else scale, bias if bias is not None else out, out,
        partials, arrivals, num_rows, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_X_SCALE=x_scale is not None, IS_SPLIT=is_split,
        EVEN_K=k == num_splits * k_per_split, BLOCK_N=config.block_n, BLOCK_M=block_m, BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


@triton.jit(do_not_specialize=["K"])
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, given_scale_ptr, K, stride_xm, stride_qm,
                          HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
                          FP8_MAX_: tl.constexpr, MIN_SCALE: tl.constexpr):
    """Row ``program_id``: its scale (given, or max |x| / 448) to scale_ptr, x / scale as FP8 to q. ONE_PASS
    (BLOCK_K covers the row): the row is loaded once and kept in registers, one memory round trip instead of two
    dependent loops: at decode a row is one program, so its latency is the kernel's."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if ONE_PASS:
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_SCALE:
            scale = tl.load(given_scale_ptr).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX_, MIN_SCALE)
        tl.store(scale_ptr + row, scale)
        q = tl.clamp(x / scale, -FP8_MAX_, FP8_MAX_)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        if HAS_SCALE:
            scale = tl.load(given_scale_ptr).to(tl.float32)
        else:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                offs = k + tl.arange(0, BLOCK_K)
                amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
            scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX_, MIN_SCALE)
        tl.store(scale_ptr + row, scale)
        for k in range(0, K, BLOCK_K):
            offs = k + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale, -FP8_MAX_, FP8_MAX_)
            tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


_ONE_PASS_MAX_K = 16384  # rows up to this long are held in registers (32 floats a thread at 16 warps)


def quantize_activation(x: torch.Tensor, scheme: ActivationScheme,
                        input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as FP8 and its float32 scales [M, 1]; the same values as ``fp8_gemm.quantize_activation``."""
    if scheme == "none":
        raise ValueError("Activation scheme 'none' does not quantize activations")
    num_rows, k = x.shape
    given = input_scale
    if scheme == "dynamic_tensor":  # one scale for the whole call: torch's reduction, then the row kernel
        given = (x.abs().amax().float() / FP8_MAX).clamp(min=_MIN_SCALE).reshape(1)
    q = torch.empty((num_rows, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((num_rows, 1), dtype=torch.float32, device=x.device)
    if num_rows:
        one_pass = k <= _ONE_PASS_MAX_K
        block_k = triton.next_power_of_2(k) if one_pass else 1024
        num_warps = 4 if block_k <= 2048 else (8 if block_k <= 8192 else 16)
        _quantize_rows_kernel[(num_rows,)](
            x, q, scale, given if given is not None else scale, k, x.stride(0), q.stride(0),
            HAS_SCALE=given is not None, BLOCK_K=block_k, ONE_PASS=one_pass, FP8_MAX_=FP8_MAX,
            MIN_SCALE=_MIN_SCALE, num_warps=num_warps,
        )
    return q, scale
