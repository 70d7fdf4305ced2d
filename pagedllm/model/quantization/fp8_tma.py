"""W8A8 FP8 GEMM for decode batches of 17..``MAX_ROWS`` rows on Hopper (sm90): both operands streamed by TMA.

``y[M, N] = (x_fp8[M, K] * s_x[M]) @ (W_fp8[N, K] * s_w[N])^T (+ bias)``, x quantized per row first (its own
launch, ``fp8_triton.quantize_activation``; a few us, against the 10-40 us of a Llama-3.1-8B projection at 64 rows).

Why another kernel: at 64 rows ``fp8_triton``'s GEMM (cp.async copies, the same transposed product) streamed the
weight at only 1.0-1.8 TB/s on Llama-3.1-8B's qkv, o and down, and cuBLASLt's ``_scaled_mm`` at 0.9-1.4 TB/s up to
128 rows, where bf16 runs at 2.8-3.7 (benchmarks/h200/issue16-fp8-weights). A step is one pass over the weight,
so the bytes in flight per SM decide the bandwidth. Here each K step is two TMA copies issued by one thread into
an mbarrier-tracked ring of ``num_stages`` slots (no per-thread 16-byte copies, no cp.async group waits, no
masks: the copy engine zero-fills rows past N or M and columns past K), and wgmma multiplies both FP8 tiles
straight from shared memory, waiting only for the MMA before the last (``wgmma.wait_group 1``).

Each program owns ``BLOCK_N`` weight rows and one K slice and computes the transposed product
``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T`` (the weight is wgmma's 64-row side, x's rows, padded to a power of
two, its narrow side), so every row block re-reads all of x from L2 (64 rows x 4096 B = 256 KB, cheap next to the
weight). Both scales and the bias are applied in ``fp8_triton.finish_tile``, which also sums split-K slices
(the last slice to arrive, in split order: deterministic). ``choose_config`` picks the split so the programs
cover the SMs evenly; ``TUNED_CONFIGS`` holds the best launch shapes of a GPU sweep
(benchmarks/scripts/fp8_microbench.py ``--sweep tma``), which take precedence.

TMA wants 16-byte aligned rows: K a multiple of 16 (``accepts``); other shapes take ``fp8_triton``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pagedllm import pdl
from pagedllm.model.quantization.fp8_gemm import FP8_DTYPE, ActivationScheme
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig, finish_tile, quantize_activation
from pagedllm.model.split_k import plan_launch, sm_count
from pagedllm.pdl import wait_for_earlier_kernels

MAX_ROWS = 256  # x padded to 256 rows: a 128 x 256 float32 accumulator is 128 registers a thread at 8 warps
_MIN_BLOCK_M = 16  # tl.dot's smallest side
_TMA_ALIGN = 16  # bytes: TMA's row-stride and base alignment
_SHARED_BYTES = 220 * 1024  # of an H100/H200 SM's 227 KB a block may use, less room for barriers and scratch
_PIPELINE_FILL_STEPS = 2  # a program's fixed cost in K steps (ring fill, epilogue), for choose_config's estimate
# (N, K, BLOCK_M) -> launch shape, the best of the H200 sweep on Llama-3.1-8B's projections
# (benchmarks/h200/session27/call3/fp8/run.log); other shapes take choose_config's estimate.
TUNED_CONFIGS: dict[tuple[int, int, int], Fp8GemmConfig] = {
    (6144, 4096, 16): Fp8GemmConfig(block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=6),
    (6144, 4096, 32): Fp8GemmConfig(block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=6),
    (6144, 4096, 64): Fp8GemmConfig(block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=6),
    (6144, 4096, 128): Fp8GemmConfig(block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=6),
    (4096, 4096, 16): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=6),
    (4096, 4096, 32): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=6),
    (4096, 4096, 64): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=6),
    (4096, 4096, 128): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=6),
    (4096, 4096, 256): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=8, num_stages=5),
    (28672, 4096, 16): Fp8GemmConfig(block_n=128, block_k=256, split_k=1, num_warps=4, num_stages=3),
    (28672, 4096, 32): Fp8GemmConfig(block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=4),
    (28672, 4096, 64): Fp8GemmConfig(block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=4),
    (4096, 14336, 16): Fp8GemmConfig(block_n=128, block_k=256, split_k=4, num_warps=4, num_stages=3),
    (4096, 14336, 32): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=6),
    (4096, 14336, 64): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=6),
    (4096, 14336, 128): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=6),
    (4096, 14336, 256): Fp8GemmConfig(block_n=64, block_k=128, split_k=2, num_warps=8, num_stages=5),
}


def block_m_for(num_rows: int) -> int:
    """x's rows padded to the dot's narrow side: a power of two, at least 16."""
    return max(_MIN_BLOCK_M, triton.next_power_of_2(num_rows))


def stage_bytes(block_n: int, block_m: int, block_k: int) -> int:
    """Shared memory of one ring slot: a weight tile and an x tile, one byte an element."""
    return (block_n + block_m) * block_k


def balanced_split(row_blocks: int, k_steps: int, num_sms: int, min_steps: int = 4) -> int:
    """The K split whose programs finish soonest when dealt round-robin to ``num_sms`` SMs that each stream at
    the same rate: the fewest slices among those minimising (programs per SM, rounded up) x (K steps per slice +
    a fixed cost per program). Slices need not divide K: TMA zero-fills past it."""
    most = max(1, k_steps // min_steps)

    def finish(split: int) -> int:
        return triton.cdiv(row_blocks * split, num_sms) * (triton.cdiv(k_steps, split) + _PIPELINE_FILL_STEPS)

    return min(range(1, most + 1), key=lambda split: (finish(split), split))


@functools.cache
def choose_config(n: int, k: int, num_sms: int, block_m: int) -> Fp8GemmConfig:
    """A launch shape for an FP8 weight [n, k] and x padded to ``block_m`` rows: a swept one from
    ``TUNED_CONFIGS``, else 128 weight rows by 128-wide K steps (a 16 KB weight tile, 128-byte swizzled rows), as
    deep a ring as one program per SM can hold (up to 6 slots: at 64 rows 5 x 16 KB of weight in flight), 8 warps
    once the float32 accumulator passes 64 registers a thread, and ``balanced_split``."""
    if (n, k, block_m) in TUNED_CONFIGS:
        return TUNED_CONFIGS[(n, k, block_m)]
    block_n, block_k = 128, 128 if k >= 128 else max(32, triton.next_power_of_2(k))
    num_stages = max(2, ring_depth(block_n, block_m, block_k, 6))
    return launch_shape(n, k, num_sms, block_m, block_n, block_k, num_stages)


def ring_depth(block_n: int, block_m: int, block_k: int, most: int) -> int:
    """The most ring slots, up to ``most``, that one program's shared memory holds for these tiles."""
    return min(most, _SHARED_BYTES // stage_bytes(block_n, block_m, block_k))


def launch_shape(n: int, k: int, num_sms: int, block_m: int, block_n: int, block_k: int,
                 num_stages: int) -> Fp8GemmConfig:
    """The launch of these tiles over W [n, k]: 8 warps once the float32 accumulator passes 64 registers a thread,
    K split by ``balanced_split``."""
    num_warps = 8 if block_n * block_m > 128 * 64 else 4
    split_k = balanced_split(triton.cdiv(n, block_n), triton.cdiv(k, block_k), num_sms)
    return Fp8GemmConfig(block_n, block_k, split_k, num_warps, num_stages)


@triton.jit(do_not_specialize=["num_rows"])
def _fp8_tma_gemm_kernel(
    w_desc, x_desc, scale_ptr, x_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr, num_rows, N,
    k_per_split, stride_om, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (row block, K slice): ``W[rows, slice] @ x[:, slice]^T`` over a ``NUM_STAGES``-slot TMA ring,
    then ``finish_tile`` (scales, bias, split-K sum)."""
    wait_for_earlier_kernels(USE_PDL)
    n_start = tl.program_id(0) * BLOCK_N
    k_start = tl.program_id(1) * k_per_split
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in tl.range(k_start, k_start + k_per_split, BLOCK_K, num_stages=NUM_STAGES):
        acc = tl.dot(w_desc.load([n_start, k]), x_desc.load([0, k]).T, acc)
    finish_tile(acc, n_start + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_M), scale_ptr, x_scale_ptr, bias_ptr,
                out_ptr, partial_ptr, arrivals_ptr, num_rows, N, stride_om, HAS_BIAS, True, IS_SPLIT, BLOCK_N,
                BLOCK_M)


@functools.cache
def has_tma(device: torch.device) -> bool:
    """Whether ``device`` has the Hopper copy engine (sm90+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``fp8_w8a8_tma_gemm`` takes x [M, K] and ``weight``: 1..MAX_ROWS rows of a float x with a unit inner
    stride, a contiguous FP8 weight [N, K] on a 16-byte boundary, and K a multiple of 16 (TMA's row alignment)."""
    k = weight.shape[-1]
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.shape[1] == k and x.stride(-1) == 1
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.dtype == FP8_DTYPE
            and weight.is_contiguous() and k % _TMA_ALIGN == 0 and weight.data_ptr() % _TMA_ALIGN == 0)


def fp8_w8a8_tma_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      scheme: ActivationScheme, input_scale: torch.Tensor | None = None,
                      config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """``x (weight * scale[:, None])^T + bias`` for x [1..MAX_ROWS, K], weight fp8 [N, K], scale float32 [N]: x
    quantized per row (``scheme``, or the static ``input_scale``), the FP8 product by TMA and wgmma, both scales
    in the epilogue; a new tensor [M, N] in x's dtype. ``config`` overrides the launch shape (tests, tuning)."""
    if not accepts(x, weight):
        raise ValueError(f"The TMA FP8 GEMM needs x [1..{MAX_ROWS} rows, K] with a unit inner stride, a contiguous "
                         f"FP8 weight [N, K] and K a multiple of {_TMA_ALIGN}; got x {tuple(x.shape)} {x.dtype}, "
                         f"weight {tuple(weight.shape)} {weight.dtype}")
    x_fp8, x_scale = quantize_activation(x, scheme, input_scale)
    return _launch(x_fp8, x_scale, weight, scale, bias, x.dtype, config)


def _launch(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None, out_dtype: torch.dtype, config: Fp8GemmConfig | None) -> torch.Tensor:
    num_rows, (n, k) = x_fp8.shape[0], weight.shape
    out = torch.empty((num_rows, n), dtype=out_dtype, device=x_fp8.device)
    block_m = block_m_for(num_rows)
    config = config or choose_config(n, k, sm_count(x_fp8.device), block_m)
    launch = plan_launch(n, k, out, block_n=config.block_n, block_k=config.block_k, block_m=block_m,
                         split_k=config.split_k)
    _fp8_tma_gemm_kernel[launch.grid](
        TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k]),
        TensorDescriptor.from_tensor(x_fp8, [block_m, config.block_k]), scale, x_scale,
        bias if bias is not None else out, out, launch.partials, launch.arrivals, num_rows, n, launch.k_per_split,
        out.stride(0), HAS_BIAS=bias is not None, IS_SPLIT=launch.is_split, BLOCK_N=config.block_n,
        BLOCK_M=block_m, BLOCK_K=config.block_k, NUM_STAGES=config.num_stages, num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl.launch_options(x_fp8.device),
    )
    return out
