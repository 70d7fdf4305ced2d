"""The W4A16 Triton GEMM (``model/w4a16_kernel.py``) and its dequantize kernel against the torch oracle of
``quantization/int4.py`` (dequantize to x's dtype, then ``F.linear``).

Without CUDA the kernels run in Triton's interpreter on small float32 CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA they also run compiled in bf16/fp16 on Llama-3.1-8B's shapes, decode (split-K) and
prefill sizes, eagerly and replayed from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

w4a16 = pytest.importorskip("pagedllm.model.w4a16_kernel")

from pagedllm.model.quantization.int4 import Int4Checkpoint, Int4Weight, dequantize, to_canonical, torch_linear
from pagedllm.model.w4a16_kernel import W4A16Config, dequantize_int4, w4a16_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]
# ||out - ref|| / ||ref|| against the oracle: the dequantized weights are identical, the sums differ in order (and
# the oracle's cuBLAS rounds its own way in half precision).
RELATIVE_ERROR = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_weight(n: int, k: int, group_size: int, has_zeros: bool, act_order: bool, seed: int,
                  scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """A random checkpoint in canonical form (act-order: a shuffled g_idx with full groups)."""
    generator = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 16, (n, k), generator=generator)
    scales = (0.5 + torch.rand(n, groups, generator=generator)) / (4 * k**0.5)
    zeros = torch.randint(0, 16, (n, groups), generator=generator) if has_zeros else None
    g_idx = None
    if act_order:
        width = k if group_size == -1 else group_size
        g_idx = (torch.arange(k) // width)[torch.randperm(k, generator=generator)]
    ckpt = Int4Checkpoint(q, scales, zeros, g_idx, group_size)
    weight = to_canonical(ckpt, scale_dtype, "test")
    return Int4Weight(*(t.to(DEVICE) if t is not None else None for t in
                        (weight.qweight, weight.scales, weight.zeros, weight.perm)), weight.group_size, k)


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    error = (out.double() - expected.double()).norm() / expected.double().norm()
    assert error < RELATIVE_ERROR[dtype], f"relative error {error:.2e}"


def oracle(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    # In float64 from the same rounded dequantized weight the kernel uses.
    w = dequantize(weight, x.dtype).double()
    xs = x.double() if weight.perm is None else x.double().index_select(-1, weight.perm)
    return F.linear(xs, w, None if bias is None else bias.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 3, 16, 37])
@pytest.mark.parametrize(
    ("n", "k", "group_size", "has_zeros", "act_order", "has_bias"),
    [(72, 96, 32, True, False, True),  # K = 3 groups of 32: tiles span several groups
     (136, 192, 64, False, True, False),  # odd number of groups, act-order, symmetric
     (64, 200, -1, True, False, False),  # one group, K not a multiple of the K tile
     (96, 384, 128, True, True, True)],
)
def test_matches_oracle(dtype, num_rows, n, k, group_size, has_zeros, act_order, has_bias) -> None:
    weight = random_weight(n, k, group_size, has_zeros, act_order, seed=n + k + num_rows)
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if has_bias else None
    expected = oracle(x, weight, bias)
    assert_close(w4a16_linear(x, weight, bias), expected, dtype)
    assert_close(w4a16_linear(x, weight, bias, dequant_min_rows=1), expected, dtype)  # dequantize + F.linear


@pytest.mark.parametrize(
    "config",
    [W4A16Config(64, 16, split_k=3), W4A16Config(32, 16, split_k=2), W4A16Config(64, 32, split_k=4),
     W4A16Config(128, 64, num_warps=8, num_stages=3)],
)
def test_configs_split_k_and_tiles(config: W4A16Config) -> None:
    dtype = DTYPES[0]
    weight = random_weight(100, 416, 32, True, True, seed=1)  # 3.25 tiles: the last slice is short and padded
    x = torch.randn(5, 416, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    assert_close(w4a16_linear(x, weight, None, config=config), oracle(x, weight, None), dtype)
    # Split launches leave their counters at zero: the next launch is right too.
    assert_close(w4a16_linear(x, weight, None, config=config), oracle(x, weight, None), dtype)


def test_dequantize_kernel_is_exact() -> None:
    for group_size, has_zeros in ((32, True), (128, False), (-1, True)):
        weight = random_weight(70, 256, group_size, has_zeros, False, seed=3)
        dtype = DTYPES[0]
        assert torch.equal(dequantize_int4(weight, dtype), dequantize(weight, dtype))


def test_leading_dims_and_empty_input() -> None:
    weight = random_weight(64, 128, 64, True, False, seed=4)
    x = torch.randn(2, 3, 128).to(DEVICE, DTYPES[0])
    assert w4a16_linear(x, weight).shape == (2, 3, 64)
    assert w4a16_linear(x[:0], weight).shape == (0, 3, 64)


# (N, K) of Llama-3.1-8B's qkv, o, gate_up and down projections.
LLAMA_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@needs_cuda
@pytest.mark.parametrize("num_rows", [1, 4, 16, 64, 200, 512])
@pytest.mark.parametrize(("n", "k"), LLAMA_8B_SHAPES)
def test_llama_shapes_on_gpu(num_rows: int, n: int, k: int) -> None:
    weight = random_weight(n, k, 128, True, num_rows == 4, seed=num_rows)
    x = torch.randn(num_rows, k, device=DEVICE, dtype=torch.bfloat16)
    assert_close(w4a16_linear(x, weight), oracle(x, weight, None), torch.bfloat16)
    assert torch.allclose(torch_linear(x, weight, None).float(), oracle(x, weight, None).float(), rtol=0.05,
                          atol=0.05 * oracle(x, weight, None).abs().max().item())


@needs_cuda
def test_cuda_graph_replay() -> None:
    weight = random_weight(4096, 4096, 128, True, False, seed=5)
    x = torch.randn(3, 4096, device=DEVICE, dtype=torch.bfloat16)
    w4a16_linear(x, weight)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_linear(x, weight)
    for seed in range(3):
        x.copy_(torch.randn(3, 4096, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        assert_close(out, oracle(x, weight, None), torch.bfloat16)
