"""The FP8 linear paths of ``fp8_triton`` (the tl.dot GEMM in its three x modes: pre-quantized FP8, quantized inside
the GEMM, weight only; the activation quantizer) and ``torch._scaled_mm`` against the torch oracle of ``fp8_gemm``.

With CUDA, the W8A8 paths run where the GPU has FP8 tensor cores (sm89+). In Triton's interpreter the FP8 casts go
through torch (``exact_fp8_casts``: the interpreter's own cast drops a rounding carry), so the W8A8 oracle is x
rounded by torch's quantizer.
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
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig, fp8_w8a8_gemm, fp8_weight_only_gemm
from tests.fp8 import exact_fp8_casts  # noqa: F401  (a fixture)
from tests.model.quantization.fp8_problems import (
    DEVICE,
    DTYPES,
    LLAMA_8B_SHAPES,
    RELATIVE_ERROR,
    assert_w8a8_linear_matches_oracle,
    fp8_rounded,
    needs_fp8_gpu,
    random_problem,
    relative_error,
)

SPLIT_CASES = [(64, 128, None), (72, 301, Fp8GemmConfig(32, 32, split_k=3)),
               (130, 300, Fp8GemmConfig(64, 64, split_k=2))]


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
@pytest.mark.parametrize("num_rows", [1, 5, 16, 33, 128])
@pytest.mark.parametrize(("n", "k", "config"), SPLIT_CASES)
def test_weight_only_gemm_matches_oracle(dtype: torch.dtype, num_rows: int, n: int, k: int,
                                         config: Fp8GemmConfig | None) -> None:
    x, weight, scale, bias = random_problem(num_rows, n, k, dtype, True, seed=n + k + num_rows, per_tensor=n == 72)
    out = fp8_weight_only_gemm(x, weight, scale, bias, config)
    assert out.dtype == dtype and out.shape == (num_rows, n)
    assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < RELATIVE_ERROR[dtype]


def test_split_k_is_repeatable() -> None:
    """Split launches leave the counters ready: twice the same result, bit for bit."""
    x, weight, scale, bias = random_problem(5, 72, 301, DTYPES[0], True, seed=7)
    config = Fp8GemmConfig(16, 32, split_k=4)
    assert torch.equal(fp8_weight_only_gemm(x, weight, scale, bias, config),
                       fp8_weight_only_gemm(x, weight, scale, bias, config))


def test_choose_config_splits_k_when_rows_are_few() -> None:
    assert fp8_triton.choose_config(28672, 4096, 132).split_k <= 2  # 448 row blocks: most SMs busy already
    o_proj = fp8_triton.choose_config(4096, 4096, 132)
    assert o_proj.split_k > 1 and 32 % o_proj.split_k == 0  # whole K steps per slice
    for n, k in LLAMA_8B_SHAPES:  # 64 rows: about one program per SM, partials at most a few slices
        config = fp8_triton.choose_config(n, k, 132, 64)
        assert config.split_k <= 4 and (n // config.block_n) * config.split_k >= 132 // 2


@pytest.mark.usefixtures("exact_fp8_casts")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("scheme", ["dynamic_token", "static"])
@pytest.mark.parametrize("num_rows", [1, 5, 17, 64, 128])
@pytest.mark.parametrize(("n", "k", "config"), SPLIT_CASES)
def test_w8a8_gemm_matches_oracle_on_fp8_rounded_x(fused: bool, scheme: str, num_rows: int, n: int, k: int,
                                                   config: Fp8GemmConfig | None) -> None:
    """Both quantizations (a launch per row; inside the GEMM per row and K block) equal the oracle run on x rounded
    the same way, and stay close to the unrounded product."""
    dtype = DTYPES[0]
    x, weight, scale, bias = random_problem(num_rows, n, k, dtype, True, seed=num_rows + n)
    input_scale = (x.abs().amax().float() / FP8_MAX).reshape(1) if scheme == "static" else None
    out = fp8_w8a8_gemm(x, weight, scale, bias, scheme, input_scale, config, fuse_quantization=fused)
    assert out.dtype == dtype and out.shape == (num_rows, n)
    block_k = (config or fp8_triton.choose_config(n, k, 8, fp8_triton.block_m_for(num_rows))).block_k
    x_rounded = fp8_rounded(x, scheme, input_scale, block_k if fused else None)
    expected = fp8_linear_reference(x_rounded, weight, scale, bias.float())
    assert relative_error(out, expected) < RELATIVE_ERROR[dtype]
    assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < 5e-2


@pytest.mark.usefixtures("exact_fp8_casts")
def test_fused_quantization_takes_dynamic_tensor_per_block() -> None:
    """One scale per call is the coarsest dynamic scheme: fused, it gets the per-block scales (at least as fine)."""
    x, weight, scale, _ = random_problem(6, 40, 200, DTYPES[0], False, seed=3)
    config = Fp8GemmConfig(32, 64)
    out = fp8_w8a8_gemm(x, weight, scale, None, "dynamic_tensor", None, config, fuse_quantization=True)
    expected = fp8_linear_reference(fp8_rounded(x, "dynamic_token", None, 64), weight, scale, None)
    assert relative_error(out, expected) < RELATIVE_ERROR[DTYPES[0]]


def test_weight_only_scheme_is_refused_by_w8a8() -> None:
    x, weight, scale, _ = random_problem(2, 16, 32, DTYPES[0], False, seed=1)
    with pytest.raises(ValueError, match="does not quantize"):
        fp8_w8a8_gemm(x, weight, scale, None, "none")


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


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a8_fused", "weight_only"])
@pytest.mark.parametrize("num_rows", [16, 64, 128])
@pytest.mark.parametrize(("n", "k"), LLAMA_8B_SHAPES)
def test_gemm_real_shapes(mode: str, num_rows: int, n: int, k: int) -> None:
    x, weight, scale, _ = random_problem(num_rows, n, k, torch.bfloat16, False, seed=n)
    if mode == "weight_only":
        out, x_rounded = fp8_weight_only_gemm(x, weight, scale), x
    else:
        fused = mode == "w8a8_fused"
        out = fp8_w8a8_gemm(x, weight, scale, None, "dynamic_token", fuse_quantization=fused)
        block_k = fp8_triton.choose_config(n, k, 132, fp8_triton.block_m_for(num_rows)).block_k
        x_rounded = fp8_rounded(x, "dynamic_token", None, block_k if fused else None)
    expected = fp8_linear_reference(x_rounded, weight, scale, None)
    assert relative_error(out, expected) < RELATIVE_ERROR[torch.bfloat16]


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_w8a8_gemm_in_a_cuda_graph(fused: bool) -> None:
    x, weight, scale, bias = random_problem(40, 4096, 4096, torch.bfloat16, True, seed=4)
    fp8_w8a8_gemm(x, weight, scale, bias, "dynamic_token", fuse_quantization=fused)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_w8a8_gemm(x, weight, scale, bias, "dynamic_token", fuse_quantization=fused)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_w8a8_gemm(x, weight, scale, bias, "dynamic_token", fuse_quantization=fused))


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["dynamic_token", "dynamic_tensor", "static"])
@pytest.mark.parametrize("num_rows", [129, 512])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (1024, 3072)])
def test_scaled_mm_path_is_w8a8(scheme: str, num_rows: int, n: int, k: int) -> None:
    """Above the Triton kernels on FP8 hardware: x quantized, _scaled_mm with row-wise scales; equal to the oracle
    run on the FP8-rounded x (up to bf16 output rounding), and close to the unrounded product."""
    assert_w8a8_linear_matches_oracle(num_rows, n, k, scheme)


@needs_fp8_gpu
@pytest.mark.gpu
def test_weight_only_scheme_never_quantizes_activations() -> None:
    """64 rows, scheme "none": the weight-only kernel (FP8 tile widened to bf16, float32 dot and scale, one bf16
    rounding at the end). Compared with the float32 oracle, its error is that one rounding: at most 2^-9 of each
    value (2^-8 with room for the float32 sums); an FP8-rounded x would be ~3e-2 off. (Against the bf16 oracle it
    was 3.4e-3 on an H200: that oracle rounds three times, the product, the scale and the scaled product.)"""
    x, weight, scale, _ = random_problem(64, 256, 512, torch.bfloat16, False, seed=2)
    out = fp8_gemm.fp8_linear(x, weight, scale, None, "none")
    assert relative_error(out, fp8_linear_reference(x.float(), weight, scale, None)) < 2.0**-8
