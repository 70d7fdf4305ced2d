"""The dot-free FP8 GEMV (1..4 rows, weight only) against the torch oracle of ``fp8_gemm``, and ``fp8_gemm``'s
choice of kernel around its switches."""

from __future__ import annotations

import pytest
import torch

fp8_gemv_module = pytest.importorskip("pagedllm.model.quantization.fp8_gemv")

from pagedllm.model.quantization import fp8_gemm
from pagedllm.model.quantization.fp8_gemm import fp8_linear, fp8_linear_reference, triton_path
from pagedllm.model.quantization.fp8_gemv import fp8_gemv
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig, fp8_w8a8_gemm, fp8_weight_only_gemm
from tests.model.quantization.fp8_problems import (
    DEVICE,
    DTYPES,
    LLAMA_8B_SHAPES,
    RELATIVE_ERROR,
    needs_fp8_gpu,
    random_problem,
    relative_error,
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k"), [(40, 97), (130, 300), (64, 1000)])
@pytest.mark.parametrize(("has_bias", "per_tensor"), [(False, False), (True, True)])
def test_gemv_matches_oracle(dtype: torch.dtype, num_rows: int, n: int, k: int, has_bias: bool,
                             per_tensor: bool) -> None:
    x, weight, scale, bias = random_problem(num_rows, n, k, dtype, has_bias, seed=n + k + num_rows,
                                            per_tensor=per_tensor)
    out = fp8_gemv(x, weight, scale, bias)
    assert out.dtype == dtype and out.shape == (num_rows, n)
    assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < RELATIVE_ERROR[dtype]


@pytest.mark.parametrize("num_rows", [1, 3, 4])
@pytest.mark.parametrize("config", [Fp8GemmConfig(8, 32, split_k=3), Fp8GemmConfig(16, 64, split_k=2, num_stages=1),
                                    Fp8GemmConfig(4, 128, split_k=2)])
def test_gemv_split_k_is_exact_and_repeatable(num_rows: int, config: Fp8GemmConfig) -> None:
    """Split launches (odd K, a ragged last slice) agree with the oracle and leave the counters ready: twice the
    same result, bit for bit."""
    dtype = DTYPES[0]
    x, weight, scale, bias = random_problem(num_rows, 72, 301, dtype, True, seed=7)
    first = fp8_gemv(x, weight, scale, bias, config)
    assert relative_error(first, fp8_linear_reference(x, weight, scale, bias)) < RELATIVE_ERROR[dtype]
    assert torch.equal(first, fp8_gemv(x, weight, scale, bias, config))


def test_gemv_refuses_more_rows_than_it_unrolls() -> None:
    x, weight, scale, _ = random_problem(5, 16, 32, DTYPES[0], False, seed=1)
    with pytest.raises(ValueError, match="fp8_gemv needs x"):
        fp8_gemv(x, weight, scale)


def test_gemv_config_fills_the_gpu_without_splitting_llama_shapes() -> None:
    for n, k in LLAMA_8B_SHAPES:
        config = fp8_gemv_module.choose_config(n, k, 1, 132)
        assert config.split_k == 1 and n // config.block_n >= 2 * 132
    small = fp8_gemv_module.choose_config(1024, 3072, 1, 132)  # 128 row blocks: K split to fill the SMs
    assert small.split_k > 1 and (3072 // small.block_k) % small.split_k == 0


def test_triton_path_follows_the_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_gemm, "GEMV_MAX_ROWS", 4)
    monkeypatch.setattr(fp8_gemm, "TRITON_MAX_ROWS", 128)
    monkeypatch.setattr(fp8_gemm, "FUSED_QUANT_MAX_ROWS", 16)
    paths = [triton_path(m, "dynamic_token") for m in (0, 1, 4, 5, 16, 17, 128, 129)]
    assert paths == [None, "gemv", "gemv", "w8a8_fused", "w8a8_fused", "w8a8", "w8a8", None]
    assert triton_path(3, "none") == "gemv" and triton_path(8, "none") == "weight_only"
    monkeypatch.setattr(fp8_gemm, "FUSED_QUANT_MAX_ROWS", 0)
    monkeypatch.setattr(fp8_gemm, "GEMV_MAX_ROWS", 0)
    assert triton_path(1, "static") == "w8a8"


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k"), LLAMA_8B_SHAPES)
def test_gemv_real_shapes(num_rows: int, n: int, k: int) -> None:
    x, weight, scale, _ = random_problem(num_rows, n, k, torch.bfloat16, False, seed=n)
    out = fp8_gemv(x, weight, scale)
    assert relative_error(out, fp8_linear_reference(x, weight, scale, None)) < RELATIVE_ERROR[torch.bfloat16]


@needs_fp8_gpu
@pytest.mark.gpu
def test_gemv_in_a_cuda_graph() -> None:
    x, weight, scale, bias = random_problem(2, 4096, 4096, torch.bfloat16, True, seed=3)
    fp8_gemv(x, weight, scale, bias)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_gemv(x, weight, scale, bias)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_gemv(x, weight, scale, bias))


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [4, 5, 128, 129])
def test_fp8_linear_dispatches_by_rows(monkeypatch: pytest.MonkeyPatch, num_rows: int) -> None:
    """On either side of each switch fp8_linear gives exactly the kernel triton_path names (deterministic
    kernels), and _scaled_mm above them."""
    monkeypatch.setattr(fp8_gemm, "GEMV_MAX_ROWS", 4)
    monkeypatch.setattr(fp8_gemm, "TRITON_MAX_ROWS", 128)
    monkeypatch.setattr(fp8_gemm, "TMA_MAX_ROWS", 0)  # its own dispatch test: test_fp8_tma.py
    x, weight, scale, bias = random_problem(num_rows, 1024, 1024, torch.bfloat16, True, seed=num_rows)
    for fused_max_rows, scheme in ((0, "dynamic_token"), (128, "dynamic_token"), (0, "none")):
        monkeypatch.setattr(fp8_gemm, "FUSED_QUANT_MAX_ROWS", fused_max_rows)
        path = triton_path(num_rows, scheme)
        expected = {
            "gemv": lambda: fp8_gemv(x, weight, scale, bias),
            "w8a8": lambda: fp8_w8a8_gemm(x, weight, scale, bias, "dynamic_token"),
            "w8a8_fused": lambda: fp8_w8a8_gemm(x, weight, scale, bias, "dynamic_token", fuse_quantization=True),
            "weight_only": lambda: fp8_weight_only_gemm(x, weight, scale, bias),
        }.get(path)
        out = fp8_linear(x, weight, scale, bias, scheme)
        if expected is None:
            assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < 4e-2
        else:
            assert torch.equal(out, expected())


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch RMSNorm of ``layers.RMSNorm`` (float32 statistics, rounded, times the weight)."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(40, 97), (130, 300), *([(6144, 4096)] if DEVICE == "cuda" else [])])
@pytest.mark.parametrize("has_residual", [False, True])
def test_rms_norm_gemv_matches_norm_then_gemv(dtype: torch.dtype, n: int, k: int, has_residual: bool) -> None:
    x, weight, scale, bias = random_problem(1, n, k, dtype, True, seed=n + k)
    generator = torch.Generator().manual_seed(k)
    residual = torch.randn(1, k, generator=generator).to(DEVICE, dtype) if has_residual else None
    norm_weight = (1 + 0.1 * torch.randn(k, generator=generator)).to(DEVICE, dtype)
    out, new_residual = fp8_gemv_module.fp8_rms_norm_gemv(x, residual, norm_weight, 1e-6, weight, scale, bias)
    summed = x + residual if has_residual else x
    assert torch.equal(new_residual, summed)
    expected = fp8_linear_reference(rms_norm_reference(summed, norm_weight, 1e-6), weight, scale, bias)
    assert out.dtype == dtype and relative_error(out, expected) < 2 * RELATIVE_ERROR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(40, 97), (72, 301), *([(4096, 14336)] if DEVICE == "cuda" else [])])
def test_silu_mul_gemv_matches_activation_then_gemv(dtype: torch.dtype, n: int, k: int) -> None:
    x, weight, scale, bias = random_problem(1, n, 2 * k, dtype, False, seed=n + k)
    weight, scale, _ = random_problem(1, n, k, dtype, False, seed=k)[1:]
    gate, up = x.chunk(2, dim=-1)
    expected = fp8_linear_reference((torch.nn.functional.silu(gate) * up).contiguous(), weight, scale, None)
    out = fp8_gemv_module.fp8_silu_mul_gemv(x, weight, scale)
    assert relative_error(out, expected) < RELATIVE_ERROR[dtype]


def test_silu_mul_gemv_split_k_is_exact_and_repeatable() -> None:
    x, _, _, _ = random_problem(1, 8, 2 * 301, DTYPES[0], False, seed=3)
    _, weight, scale, bias = random_problem(1, 72, 301, DTYPES[0], True, seed=4)
    config = Fp8GemmConfig(8, 32, split_k=3)
    first = fp8_gemv_module.fp8_silu_mul_gemv(x, weight, scale, bias, config)
    gate, up = x.chunk(2, dim=-1)
    expected = fp8_linear_reference((torch.nn.functional.silu(gate) * up).contiguous(), weight, scale, bias)
    assert relative_error(first, expected) < RELATIVE_ERROR[DTYPES[0]]
    assert torch.equal(first, fp8_gemv_module.fp8_silu_mul_gemv(x, weight, scale, bias, config))


def test_rms_norm_gemv_never_splits_k() -> None:
    """The norm needs each row's whole sum of squares: a split config still gives the unsplit result."""
    x, weight, scale, _ = random_problem(1, 72, 301, DTYPES[0], False, seed=5)
    norm_weight = torch.ones(301, device=DEVICE, dtype=DTYPES[0])
    split, _ = fp8_gemv_module.fp8_rms_norm_gemv(x, None, norm_weight, 1e-6, weight, scale, None,
                                                 Fp8GemmConfig(8, 32, split_k=3))
    whole, _ = fp8_gemv_module.fp8_rms_norm_gemv(x, None, norm_weight, 1e-6, weight, scale, None,
                                                 Fp8GemmConfig(8, 32, split_k=1))
    assert torch.equal(split, whole)


def test_fused_gemvs_refuse_more_than_one_row() -> None:
    x, weight, scale, _ = random_problem(2, 16, 32, DTYPES[0], False, seed=1)
    with pytest.raises(ValueError, match="one contiguous row"):
        fp8_gemv_module.fp8_rms_norm_gemv(x, None, torch.ones(32, device=DEVICE, dtype=x.dtype), 1e-6, weight, scale)
    with pytest.raises(ValueError, match="one contiguous row"):
        fp8_gemv_module.fp8_silu_mul_gemv(x[:1], weight, scale)  # 32 columns: not the 2 * K the weight needs
