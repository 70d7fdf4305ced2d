"""Triton kernels of the FP8 linear layers for batches of up to ``MAX_ROWS`` rows (CUDA, sm89+; the tests also run
them in Triton's interpreter on CPU), and the per-row activation quantizer. The dot-free GEMV that serves 1..4
rows is ``fp8_gemv``; ``fp8_gemm`` picks between them.

``_fp8_gemm_kernel``: ``y[M, N] = x[M, K] @ (W_fp8[N, K] * s[N])^T (+ bias)``. Each program owns ``BLOCK_N`` weight
rows and one K slice and computes the transposed product ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T`` with
``tl.dot`` (x's rows padded to a power of two, at least 16, tl.dot's smallest side); the per-channel weight scale
is applied once to the float32 result. How x meets the FP8 weight (``X_MODE``):

- ``"fp8"`` (``fp8_w8a8_gemm``): x quantized per row by ``quantize_activation`` (its own launch), an FP8 x FP8 dot
  straight from shared memory, x's row scales in the epilogue;
- ``"quantize_dynamic"`` / ``"quantize_static"`` (``fp8_w8a8_gemm(fuse_quantization=True)``): x read in its 16-bit
  dtype and quantized inside the K loop, so no separate launch. A per-row scale needs the whole row, so the dynamic
  scale is taken per row and ``BLOCK_K``-wide block of K instead (that block's max / 448, the same arithmetic as
  the row quantizer on a shorter row): finer than per row, so at least as accurate; each block's FP8 product is
  scaled as it is accumulated. A static (checkpoint) scale is used as given;
- ``"widen"`` (``fp8_weight_only_gemm``): the FP8 tile widened to x's dtype in registers and a 16-bit dot; also
  the path of weight-only FP8 checkpoints. On an H200 it streamed 1.4-2.2 TB/s at 1..16 rows
  (benchmarks/h200/issue16-fp8-weights).

Split K: when the row blocks alone leave SMs idle, each program writes its float32 partial and the last program of
a row block to arrive (an atomic counter, ``model/split_k.py``) sums them in split order: one launch, deterministic,
no memset. ``finish_tile`` is shared with ``fp8_gemv``.

``quantize_activation``: x [M, K] -> FP8 with a scale per row (dynamic: its max / 448) or one given scale, in one
launch instead of torch's four (abs, amax, divide, cast), ahead of the ``"fp8"`` mode and ``torch._scaled_mm``.

Every launch allocates fixed-size buffers and reads nothing back to the host: CUDA-graph capturable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm import pdl
from pagedllm.model.quantization.fp8_gemm import _MIN_SCALE, FP8_DTYPE, FP8_MAX, ActivationScheme
from pagedllm.model.split_k import even_split, plan_launch, sm_count
from pagedllm.pdl import wait_for_earlier_kernels

MAX_ROWS = 128  # the largest x this module's GEMM serves
_MIN_BLOCK_M = 16  # tl.dot's smallest tile side: x's rows are padded to it
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE_ = tl.constexpr(_MIN_SCALE)


@dataclass(frozen=True)
class Fp8GemmConfig:
    """Launch shape: weight rows per program, K per loop step, K slices, warps, pipeline depth."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


def block_m_for(num_rows: int) -> int:
    """x's rows padded to the dot's tile: a power of two, at least 16."""
    return max(_MIN_BLOCK_M, triton.next_power_of_2(num_rows))


@functools.cache
def choose_config(n: int, k: int, num_sms: int, block_m: int = _MIN_BLOCK_M) -> Fp8GemmConfig:
    """A launch shape for an FP8 weight [n, k] and x padded to ``block_m`` rows; 128-wide K steps, K split into
    equal whole-step slices (each at least 4 steps long) until the programs fill the SMs.

    Up to 16 rows: 64-row blocks, about four programs per SM (on an H200 the weight-only kernel ran fastest with the
    most slices swept, 4, on all of Llama-3.1-8B's projections). From 32 rows (not measured yet; the microbenchmark's
    sweep prints the best shapes): 128-row blocks and about one program per SM, since every row block re-reads all
    of x and the partial sums of a split grow with the rows (at 64 rows, 64-row blocks split 8 ways wrote half as
    many bytes of partials as the weight has, and ran at 0.8 TB/s)."""
    block_k = 128 if k >= 128 else max(32, triton.next_power_of_2(k))
    block_n, programs_per_sm = (64, 4) if block_m <= _MIN_BLOCK_M else (128, 1)
    row_blocks = triton.cdiv(n, block_n)
    split_k = even_split(triton.cdiv(k, block_k), triton.cdiv(programs_per_sm * num_sms, row_blocks), 4)
    num_warps = 8 if block_n * block_m >= 128 * 128 else 4  # float32 accumulators: 64 registers a thread at most
    return Fp8GemmConfig(block_n, block_k, split_k, num_warps, num_stages=3 if block_m >= 128 else 4)


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
def finish_tile(acc, offs_n, offs_m, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
                num_rows, N, stride_om, HAS_BIAS: tl.constexpr, HAS_X_SCALE: tl.constexpr, IS_SPLIT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Write this program's float32 ``acc`` [BLOCK_N, BLOCK_M] (row block ``program_id(0)``, K slice
    ``program_id(1)``) as output; in a split launch as a partial, and the row block's last slice to arrive sums
    all partials in split order (the same sum whichever came last) and writes the output."""
    if IS_SPLIT:
        row_block = tl.program_id(0)
        num_splits = tl.num_programs(1)
        # partials [num_splits, row blocks * BLOCK_N, BLOCK_M]: padded rows, so no masks.
        tile = offs_n[:, None] * BLOCK_M + offs_m[None, :]
        split_stride = tl.num_programs(0) * BLOCK_N * BLOCK_M
        tl.store(partial_ptr + tl.program_id(1) * split_stride + tile, acc)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(arrivals_ptr + row_block, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(num_splits):
                total += tl.load(partial_ptr + s * split_stride + tile, cache_modifier=".cg")
            _store_output(total, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om,
                          HAS_BIAS, HAS_X_SCALE)
            tl.store(arrivals_ptr + row_block, 0)  # ready for the next launch (or graph replay)
    else:
        _store_output(acc, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, offs_n, offs_m, num_rows, N, stride_om,
                      HAS_BIAS, HAS_X_SCALE)


@triton.jit
def _accumulate(acc, w, x, x_scale, X_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc`` plus weight tile ``w`` [BLOCK_N, BLOCK_K] (FP8) times x's tile ``x`` [BLOCK_K, BLOCK_M], as
    ``X_MODE`` says (module docstring); ``x_scale`` is the static scale of ``quantize_static``."""
    if X_MODE == "widen":
        acc = tl.dot(w.to(x.dtype), x, acc, input_precision=DOT_PRECISION)
    elif X_MODE == "fp8":
        acc = tl.dot(w, x, acc)
    elif X_MODE == "quantize_static":
        x_fp8 = tl.clamp(x.to(tl.float32) / x_scale, -_FP8_MAX, _FP8_MAX).to(w.dtype)
        acc = tl.dot(w, x_fp8, acc)
    else:  # quantize_dynamic: a scale per row of this K block (its max / 448, as the row quantizer computes it)
        x32 = x.to(tl.float32)
        block_scale = tl.maximum(tl.max(tl.abs(x32), axis=0) / _FP8_MAX, _MIN_SCALE_)
        x_fp8 = tl.clamp(x32 / block_scale[None, :], -_FP8_MAX, _FP8_MAX).to(w.dtype)
        acc += tl.dot(w, x_fp8) * block_scale[None, :]
    return acc


@triton.jit
def _partial_product(x_ptr, w_ptr, x_scale, offs_n, offs_m, k_start, num_rows, N, K, k_per_split, stride_xm,
                     stride_wn, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, X_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``W[offs_n, k_start : k_start + k_per_split] @ x[:, same]^T`` as float32 [BLOCK_N, BLOCK_M], without the
    weight scale."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # Rows past N re-read row N - 1: the weight stream needs no row mask, and those results are never stored.
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    x_rows = offs_m[None, :] < num_rows
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=x_rows, other=0.0)
        else:
            in_k = (offs_k + k) < K
            w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=x_rows & in_k[:, None], other=0.0)
        acc = _accumulate(acc, w, x, x_scale, X_MODE, DOT_PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return acc


@triton.jit(do_not_specialize=["num_rows"])
def _fp8_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, num_rows, N, K,
    k_per_split, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, X_MODE: tl.constexpr, IS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row block, K slice): one partial product, finished by ``finish_tile``. ``x_scale_ptr``: x's row
    scales (``fp8``) or the static scale (``quantize_static``)."""
    wait_for_earlier_kernels(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    static_scale = 1.0
    if X_MODE == "quantize_static":
        static_scale = tl.load(x_scale_ptr).to(tl.float32)
    acc = _partial_product(x_ptr, w_ptr, static_scale, offs_n, offs_m, tl.program_id(1) * k_per_split, num_rows,
                           N, K, k_per_split, stride_xm, stride_wn, BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K, X_MODE,
                           DOT_PRECISION)
    if X_MODE == "quantize_static":
        acc = acc * static_scale
    finish_tile(acc, offs_n, offs_m, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, num_rows,
                N, stride_om, HAS_BIAS, X_MODE == "fp8", IS_SPLIT, BLOCK_N, BLOCK_M)


def accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels here (and ``fp8_gemv``) can take x [M, K] and ``weight``: a unit inner stride, a float
    dtype, and a contiguous FP8 weight [N, K]. Row limits are the dispatcher's (``fp8_gemm``)."""
    return (x.dim() == 2 and x.stride(-1) == 1 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.dtype == FP8_DTYPE and weight.is_contiguous() and weight.shape[1] == x.shape[1])


def fp8_weight_only_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                         config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """``x (weight * scale[:, None])^T + bias`` for x [1..MAX_ROWS, K] in 16 or 32 bits, weight fp8 [N, K], scale
    float32 [N]: the weight widened to x's dtype (x never quantized); a new tensor [M, N] in x's dtype. ``config``
    overrides the launch shape (tests, tuning)."""
    _check(x, weight)
    return _gemm(x, None, weight, scale, bias, "widen", config)


def fp8_w8a8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  scheme: ActivationScheme, input_scale: torch.Tensor | None = None,
                  config: Fp8GemmConfig | None = None, fuse_quantization: bool = False) -> torch.Tensor:
    """W8A8 for x [1..MAX_ROWS, K]: an FP8 x FP8 dot, both scales in the epilogue; a new tensor [M, N] in x's
    dtype. x is quantized per row by a separate launch (``scheme``), or with ``fuse_quantization`` inside the GEMM
    (dynamic schemes per row and K block, static with the given scale; module docstring)."""
    if scheme == "none":
        raise ValueError("Activation scheme 'none' does not quantize activations: use fp8_weight_only_gemm")
    _check(x, weight)
    if fuse_quantization:
        static = scheme == "static"
        return _gemm(x, input_scale if static else None, weight, scale, bias,
                     "quantize_static" if static else "quantize_dynamic", config)
    x_fp8, x_scale = quantize_activation(x, scheme, input_scale)
    return _gemm(x_fp8, x_scale, weight, scale, bias, "fp8", config, out_dtype=x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not accepts(x, weight) or not 0 < x.shape[0] <= MAX_ROWS:
        raise ValueError(f"The FP8 GEMM needs x [1..{MAX_ROWS} rows, K] with a unit inner stride and a contiguous "
                         f"FP8 weight [N, K]; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}")


def _gemm(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor,
          bias: torch.Tensor | None, x_mode: str, config: Fp8GemmConfig | None,
          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launch ``_fp8_gemm_kernel`` in ``x_mode`` on a checked (possibly already quantized) x."""
    num_rows, (n, k) = x.shape[0], weight.shape
    out = torch.empty((num_rows, n), dtype=out_dtype or x.dtype, device=x.device)
    block_m = block_m_for(num_rows)
    config = config or choose_config(n, k, sm_count(x.device), block_m)
    launch = plan_launch(n, k, out, block_n=config.block_n, block_k=config.block_k, block_m=block_m,
                         split_k=config.split_k)
    _fp8_gemm_kernel[launch.grid](
        x, weight, scale, x_scale if x_scale is not None else scale, bias if bias is not None else out, out,
        launch.partials, launch.arrivals, num_rows, n, k, launch.k_per_split, x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, X_MODE=x_mode, IS_SPLIT=launch.is_split, EVEN_K=launch.even_k,
        BLOCK_N=config.block_n, BLOCK_M=block_m, BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_options(x.device),
    )
    return out


@triton.jit(do_not_specialize=["K"])
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, given_scale_ptr, K, stride_xm, stride_qm,
                          HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
                          USE_PDL: tl.constexpr):
    """Row ``program_id``: its scale (given, or max |x| / 448) to scale_ptr, x / scale as FP8 to q. ONE_PASS
    (BLOCK_K covers the row): the row is loaded once and kept in registers, one memory round trip instead of two
    dependent loops: at decode a row is one program, so its latency is the kernel's."""
    wait_for_earlier_kernels(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if ONE_PASS:
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_SCALE:
            scale = tl.load(given_scale_ptr).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) / _FP8_MAX, _MIN_SCALE_)
        tl.store(scale_ptr + row, scale)
        q = tl.clamp(x / scale, -_FP8_MAX, _FP8_MAX)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        if HAS_SCALE:
            scale = tl.load(given_scale_ptr).to(tl.float32)
        else:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                offs = k + tl.arange(0, BLOCK_K)
                amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
            scale = tl.maximum(tl.max(amax, axis=0) / _FP8_MAX, _MIN_SCALE_)
        tl.store(scale_ptr + row, scale)
        for k in range(0, K, BLOCK_K):
            offs = k + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale, -_FP8_MAX, _FP8_MAX)
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
            HAS_SCALE=given is not None, BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=num_warps,
            **pdl.launch_options(x.device),
        )
    return q, scale
