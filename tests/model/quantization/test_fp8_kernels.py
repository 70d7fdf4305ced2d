"""The FP8 linear paths (``fp8_triton``'s skinny GEMM and activation quantizer, ``torch._scaled_mm``) against the
torch oracle of ``fp8_gemm``.

Without CUDA the Triton kernels run in Triton's interpreter on small float32 CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA they also run compiled in bf16/fp16 on Llama-3.1-8B's shapes, and the W8A8
``_scaled_mm`` path is checked where the GPU has FP8 tensor cores (sm89+).
"""

from __future__ import annotations

import pytest
import torch

fp8_triton = pytest.importorskip("pagedllm.model.quantization.fp8_triton")

from pagedllm.model.quantization import fp8_gemm
from pagedllm.model.quantization.fp8_gemm import (
    FP8_MAX,
    fp8_linear,
    fp8_linear_reference,
    quantize_activation,
    quantize_weight,
)
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig, fp8_skinny_gemm, fp8_w8a8_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]
# ||out - ref|| / ||ref||: the reference rounds x W in x's dtype; float32 differs by summation order.
RELATIVE_ERROR = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_fp8_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                                   reason="needs a GPU with FP8 tensor cores (sm89+)")
LLAMA_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down


def random_problem(num_rows: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    weight, scale = quantize_weight(torch.randn(n, k, generator=generator) / k**0.5)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if has_bias else None
    return x, weight.to(DEVICE), scale.to(DEVICE), bias


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_quantize_weight_round_trip() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=generator) * torch.linspace(0.01, 3.0, 37)[:, None]  # rows of unlike ranges
    q, scale = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (37,)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((37,), FP8_MAX))  # each row's max maps to 448
    # e4m3 keeps 3 mantissa bits: each value within half a step (1/16 relative) of the original, or within half
    # the subnormal step (2^-10 of the scale) below the normal range.
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= torch.maximum(w.abs() / 16, 2.0**-10 * scale[:, None]) * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 3, 16])
@pytest.mark.parametrize(("n", "k"), [(64, 128), (40, 97), (130, 300), (96, 1000)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_skinny_gemm_matches_oracle(dtype: torch.dtype, num_rows: int, n: int, k: int, has_bias: bool) -> None:
    x, weight, scale, bias = random_problem(num_rows, n, k, dtype, has_bias, seed=n + k + num_rows)
    out = fp8_skinny_gemm(x, weight, scale, bias)
    assert out.dtype == dtype and out.shape == (num_rows, n)
    assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < RELATIVE_ERROR[dtype]


@pytest.mark.parametrize("config", [Fp8GemmConfig(32, 32, split_k=3), Fp8GemmConfig(64, 64, split_k=4),
                                    Fp8GemmConfig(16, 32, split_k=2)])
def test_split_k_is_exact_and_repeatable(config: Fp8GemmConfig) -> None:
    """Split launches (odd K, a ragged last slice) agree with the oracle and leave the counters ready: twice the
    same result, bit for bit."""
    dtype = DTYPES[0]
    x, weight, scale, bias = random_problem(5, 72, 301, dtype, True, seed=7)
    first = fp8_skinny_gemm(x, weight, scale, bias, config)
    assert relative_error(first, fp8_linear_reference(x, weight, scale, bias)) < RELATIVE_ERROR[dtype]
    assert torch.equal(first, fp8_skinny_gemm(x, weight, scale, bias, config))


def test_choose_config_splits_k_when_rows_are_few() -> None:
    assert fp8_triton.choose_config(28672, 4096, 132).split_k <= 2  # 448 row blocks: most SMs busy already
    o_proj = fp8_triton.choose_config(4096, 4096, 132)
    assert o_proj.split_k > 1 and 32 % o_proj.split_k == 0  # whole K steps per slice


def w8a8_reference(x, weight, scale, bias, scheme, input_scale):
    """The oracle run on x rounded to FP8 by the kernel's own quantizer (checked against torch's above; in the
    interpreter it rounds some values differently, see test_quantize_activation_matches_torch)."""
    x_fp8, x_scale = fp8_triton.quantize_activation(x, scheme, input_scale)
    return fp8_linear_reference((x_fp8.float() * x_scale).to(x.dtype), weight, scale, bias)


@pytest.mark.parametrize("scheme", ["dynamic_token", "static"])
@pytest.mark.parametrize("num_rows", [1, 5, 16, 33, 64])
@pytest.mark.parametrize(("n", "k", "config"), [(64, 128, None), (72, 301, Fp8GemmConfig(32, 32, split_k=3)),
                                                (130, 300, Fp8GemmConfig(64, 64, split_k=2))])
def test_w8a8_gemm_matches_oracle_on_fp8_rounded_x(scheme: str, num_rows: int, n: int, k: int,
                                                   config: Fp8GemmConfig | None) -> None:
    dtype = DTYPES[0]
    x, weight, scale, bias = random_problem(num_rows, n, k, dtype, True, seed=num_rows + n)
    input_scale = (x.abs().amax().float() / FP8_MAX).reshape(1) if scheme == "static" else None
    out = fp8_w8a8_gemm(x, weight, scale, bias, scheme, input_scale, config)
    assert out.dtype == dtype and out.shape == (num_rows, n)
    expected = w8a8_reference(x, weight, scale, bias, scheme, input_scale)
    assert relative_error(out, expected) < RELATIVE_ERROR[dtype]
    assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < (5e-2 if DEVICE == "cuda" else 0.1)


@pytest.mark.parametrize("scheme", ["dynamic_token", "dynamic_tensor", "static"])
@pytest.mark.parametrize(("num_rows", "k"), [(1, 64), (7, 333), (33, 2100), (2, 16385)])  # the last: two passes
def test_quantize_activation_matches_torch(scheme: str, num_rows: int, k: int) -> None:
    generator = torch.Generator().manual_seed(num_rows * k)
    x = (torch.randn(num_rows, k, generator=generator) * torch.rand(num_rows, 1, generator=generator) * 5)
    x = x.to(DEVICE, DTYPES[0])
    x[0, :] = 0.0  # an all-zero row gets a finite scale
    input_scale = torch.tensor([0.02], device=DEVICE) if scheme == "static" else None
    q, scale = fp8_triton.quantize_activation(x, scheme, input_scale)
    q_ref, scale_ref = quantize_activation(x, scheme, input_scale)
    assert q.shape == (num_rows, k) and scale.shape == (num_rows, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    q, q_ref = q.float(), q_ref.float()
    subnormal_step = 1e-6
    if DEVICE == "cpu":
        # Triton's interpreter drops the carry when rounding up overflows the mantissa (1.97 -> 1.0, not 2.0; a
        # compiled kernel's cvt.rn.satfinite gets 2.0) and truncates subnormals (below 2^-6): accept exactly
        # those there.
        carry_dropped = (q == q_ref / 2) & (torch.frexp(q_ref)[0].abs() == 0.5)
        q = torch.where(carry_dropped, q_ref, q)
        subnormal_step = 2.0**-9
    # The same FP8 value, or its neighbour where x / scale fell on a rounding tie computed in another order.
    assert (q - q_ref).abs().le(q_ref.abs() / 8 + subnormal_step).all()
    assert (q == q_ref).float().mean() > 0.99


def test_cpu_path_is_the_oracle() -> None:
    x, weight, scale, bias = random_problem(4, 24, 40, torch.float32, True, seed=1)
    x, weight, scale, bias = x.cpu(), weight.cpu(), scale.cpu(), bias.cpu()
    dense = weight.float() * scale[:, None]
    expected = x @ dense.T + bias
    torch.testing.assert_close(fp8_linear(x[None], weight, scale, bias, "dynamic_token")[0], expected,
                               atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [1, 4, 16])
@pytest.mark.parametrize(("n", "k"), LLAMA_8B_SHAPES)
def test_skinny_gemm_real_shapes(num_rows: int, n: int, k: int) -> None:
    x, weight, scale, bias = random_problem(num_rows, n, k, torch.bfloat16, False, seed=n)
    out = fp8_skinny_gemm(x, weight, scale)
    assert relative_error(out, fp8_linear_reference(x, weight, scale, None)) < RELATIVE_ERROR[torch.bfloat16]


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [1, 16, 64])
@pytest.mark.parametrize(("n", "k"), LLAMA_8B_SHAPES)
def test_w8a8_gemm_real_shapes(num_rows: int, n: int, k: int) -> None:
    x, weight, scale, bias = random_problem(num_rows, n, k, torch.bfloat16, False, seed=n)
    out = fp8_w8a8_gemm(x, weight, scale, None, "dynamic_token")
    expected = w8a8_reference(x, weight, scale, None, "dynamic_token", None)
    assert relative_error(out, expected) < RELATIVE_ERROR[torch.bfloat16]


@needs_fp8_gpu
@pytest.mark.gpu
def test_w8a8_gemm_in_a_cuda_graph() -> None:
    x, weight, scale, bias = random_problem(40, 4096, 4096, torch.bfloat16, True, seed=4)
    fp8_w8a8_gemm(x, weight, scale, bias, "dynamic_token")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_w8a8_gemm(x, weight, scale, bias, "dynamic_token")
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_w8a8_gemm(x, weight, scale, bias, "dynamic_token"))


@needs_cuda
@pytest.mark.gpu
def test_skinny_gemm_in_a_cuda_graph() -> None:
    x, weight, scale, bias = random_problem(2, 4096, 4096, torch.bfloat16, True, seed=3)
    fp8_skinny_gemm(x, weight, scale, bias)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_skinny_gemm(x, weight, scale, bias)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_skinny_gemm(x, weight, scale, bias))


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["dynamic_token", "dynamic_tensor", "static"])
@pytest.mark.parametrize("num_rows", [17, 64, 100, 512])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (1024, 3072)])
def test_scaled_mm_path_is_w8a8(scheme: str, num_rows: int, n: int, k: int) -> None:
    """Above 16 rows on FP8 hardware: x quantized, _scaled_mm with row-wise scales; equal to the oracle run on the
    FP8-rounded x (up to bf16 output rounding), and close to the unrounded product."""
    x, weight, scale, bias = random_problem(num_rows, n, k, torch.bfloat16, True, seed=num_rows)
    input_scale = (x.abs().amax().float() / FP8_MAX).reshape(1) if scheme == "static" else None
    out = fp8_linear(x, weight, scale, bias, scheme, input_scale)
    x_fp8, x_scale = quantize_activation(x, scheme, input_scale)
    x_rounded = (x_fp8.float() * x_scale).to(torch.bfloat16)
    assert relative_error(out, fp8_linear_reference(x_rounded, weight, scale, bias)) < 8e-3
    assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < 4e-2


@needs_cuda
@pytest.mark.gpu
def test_weight_only_scheme_never_quantizes_activations() -> None:
    x, weight, scale, bias = random_problem(64, 256, 512, torch.bfloat16, False, seed=2)
    out = fp8_gemm.fp8_linear(x, weight, scale, None, "none")
    assert relative_error(out, fp8_linear_reference(x, weight, scale, None)) < 1e-3
