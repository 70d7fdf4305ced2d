"""Random FP8 linear problems and the torch oracle's tolerances, for the FP8 kernel tests.

Without CUDA the Triton kernels run in Triton's interpreter on small float32 CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA in bf16/fp16, compiled.
"""

from __future__ import annotations

import pytest
import torch
import triton

from pagedllm.model.quantization.fp8_gemm import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_linear,
    fp8_linear_reference,
    quantize_activation,
    quantize_weight,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]
# ||out - ref|| / ||ref||: the reference rounds x W in x's dtype; float32 differs by summation order.
RELATIVE_ERROR = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}
LLAMA_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down
needs_fp8_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                                   reason="needs a GPU with FP8 tensor cores (sm89+)")


def random_problem(num_rows: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, seed: int,
                   per_tensor: bool = False):
    """x [num_rows, k], an FP8 weight [n, k] with its float32 scale [n] (per channel, or one per-tensor scale
    expanded to every row, as ``Fp8LinearMethod`` stores it), and a bias or None."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    dense = torch.randn(n, k, generator=generator) / k**0.5
    if per_tensor:
        scale = (dense.abs().amax() / FP8_MAX).expand(n).contiguous()
        weight = (dense / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    else:
        weight, scale = quantize_weight(dense)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if has_bias else None
    return x, weight.to(DEVICE), scale.to(DEVICE), bias


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def fp8_rounded(x: torch.Tensor, scheme: str, input_scale: torch.Tensor | None,
                block_k: int | None = None) -> torch.Tensor:
    """x as the W8A8 kernels see it, in float32: rounded to FP8 per row (or with the static scale), or with
    ``block_k`` per row and ``block_k``-wide block of K (the fused quantization's dynamic scales)."""
    if block_k is None or scheme == "static":
        q, scale = quantize_activation(x, scheme, input_scale)
        return q.float() * scale
    num_rows, k = x.shape
    width = triton.cdiv(k, block_k) * block_k
    padded = torch.zeros(num_rows, width, dtype=x.dtype, device=x.device)  # zeros change no block's max
    padded[:, :k] = x
    q, scale = quantize_activation(padded.reshape(-1, block_k), "dynamic_token", None)
    return (q.float() * scale).reshape(num_rows, width)[:, :k]


def static_input_scale(x: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """The per-tensor input scale a checkpoint would hold for x under ``scheme`` "static" (else None)."""
    return (x.abs().amax().float() / FP8_MAX).reshape(1) if scheme == "static" else None


def assert_w8a8_linear_matches_oracle(num_rows: int, n: int, k: int, scheme: str, per_tensor: bool = False) -> None:
    """``fp8_linear`` on bf16 x, whichever W8A8 path serves these rows: the oracle run on the FP8-rounded x up to
    bf16 output rounding, and close to the unrounded product."""
    x, weight, scale, bias = random_problem(num_rows, n, k, torch.bfloat16, True, seed=num_rows,
                                            per_tensor=per_tensor)
    input_scale = static_input_scale(x, scheme)
    out = fp8_linear(x, weight, scale, bias, scheme, input_scale)
    x_rounded = fp8_rounded(x, scheme, input_scale).to(torch.bfloat16)
    assert relative_error(out, fp8_linear_reference(x_rounded, weight, scale, bias)) < 8e-3
    assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < 4e-2
