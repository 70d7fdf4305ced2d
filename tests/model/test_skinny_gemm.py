"""The skinny-GEMM kernel (``model/skinny_gemm.py``) against ``F.linear``.

Without CUDA the kernel runs in Triton's interpreter on small float32 CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA it also runs compiled in bfloat16/float16 on the real layer shapes of Qwen3-0.6B and
Llama-3.1-8B, eagerly and replayed from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

skinny = pytest.importorskip("pagedllm.model.skinny_gemm")

from pagedllm.model.linear import Linear
from pagedllm.model.skinny_gemm import SkinnyGemmConfig, skinny_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else [torch.float32]
# ||out - ref|| / ||ref||: one rounding of the output for half precision; float32 differs by summation order.
RELATIVE_ERROR = {torch.bfloat16: 6e-3, torch.float16: 1e-3, torch.float32: 1e-5}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (N, K) of Qwen3-0.6B's qkv, o, gate_up and down projections, then Llama-3.1-8B's.
REAL_SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072),
               (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def random_problem(num_rows: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if has_bias else None
    return x, weight, bias


def assert_matches_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    # Reference in float64 from the same (rounded) inputs; F.linear in the dtype has its own rounding too.
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    error = (out.double() - expected).norm() / expected.norm()
    assert error < RELATIVE_ERROR[x.dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 2, 5, 16])
@pytest.mark.parametrize(("n", "k", "has_bias"), [(100, 37, True), (193, 300, False), (64, 256, True)])
def test_matches_linear_on_odd_shapes(dtype: torch.dtype, num_rows: int, n: int, k: int, has_bias: bool) -> None:
    x, weight, bias = random_problem(num_rows, n, k, dtype, has_bias, seed=num_rows * n + k)
    assert_matches_linear(skinny_gemm(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize("num_rows", [1, 3, 16])
@pytest.mark.parametrize(
    ("n", "k", "config"),
    [
        (70, 200, SkinnyGemmConfig(block_n=16, block_k=32, split_k=3)),  # uneven K slices, partial row block
        (130, 512, SkinnyGemmConfig(block_n=32, block_k=64, split_k=4)),  # even slices
        (40, 100, SkinnyGemmConfig(block_n=16, block_k=64, split_k=8)),  # more slices asked than K steps
    ],
)
def test_split_k_matches_and_resets_counters(num_rows: int, n: int, k: int, config: SkinnyGemmConfig) -> None:
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x, weight, bias = random_problem(num_rows, n, k, dtype, True, seed=n + k + num_rows)
    for _ in range(2):  # the second launch relies on the first having reset its counters
        assert_matches_linear(skinny_gemm(x, weight, bias, config), x, weight, bias)
    assert not skinny._arrival_counters(x.device).any()


def test_strided_rows_and_leading_dims() -> None:
    """Rows of a wider buffer (a strided view) and a 3-D input, as the model's reshaped activations can be."""
    wide = torch.randn(4, 300, device=DEVICE)
    weight = torch.randn(50, 120, device=DEVICE)
    x = wide[:, 7:127]
    assert_matches_linear(skinny_gemm(x, weight), x, weight, None)
    x3d = torch.randn(2, 3, 120, device=DEVICE)
    out = skinny_gemm(x3d, weight)
    assert out.shape == (2, 3, 50)
    assert_matches_linear(out.reshape(6, 50), x3d.reshape(6, 120), weight, None)


def test_accepts_only_decode_sized_half_precision_inputs() -> None:
    weight = torch.empty(8, 32, dtype=torch.bfloat16)
    assert skinny.accepts(torch.empty(16, 32, dtype=torch.bfloat16), weight)
    assert not skinny.accepts(torch.empty(17, 32, dtype=torch.bfloat16), weight)  # a prefill: cuBLAS
    assert not skinny.accepts(torch.empty(0, 32, dtype=torch.bfloat16), weight)
    assert not skinny.accepts(torch.empty(1, 32), weight.float())  # float32 stays on cuBLAS
    assert not skinny.accepts(torch.empty(1, 32, dtype=torch.float16), weight)
    assert not skinny.accepts(torch.empty(1, 32, dtype=torch.bfloat16), torch.empty(32, 8, dtype=torch.bfloat16).t())


def test_cpu_linear_stays_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(skinny, "skinny_gemm", lambda *args: pytest.fail("CPU input reached the kernel"))
    layer = Linear(16, 8, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), REAL_SHAPES)
def test_real_shapes_match_linear(dtype: torch.dtype, n: int, k: int) -> None:
    for num_rows in (1, 4, 8, 16):
        x, weight, bias = random_problem(num_rows, n, k, dtype, n == 4096, seed=n + k + num_rows)
        assert_matches_linear(skinny_gemm(x, weight, bias), x, weight, bias)


@needs_cuda
@pytest.mark.parametrize(("n", "k"), [(1024, 3072), (4096, 1024)])  # split-K, and not
def test_graph_replay_matches_eager_and_is_deterministic(n: int, k: int) -> None:
    x, weight, bias = random_problem(4, n, k, torch.bfloat16, True, seed=1)
    eager = skinny_gemm(x, weight, bias)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = skinny_gemm(x, weight, bias)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, skinny_gemm(x, weight, bias))  # same sum order every launch
    assert not torch.equal(captured, eager)  # the replays really computed with the new inputs


@needs_cuda
def test_linear_routes_decode_batches_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel = skinny.skinny_gemm
    monkeypatch.setattr(skinny, "skinny_gemm", lambda *args: calls.append(args[0].shape[0]) or kernel(*args))
    layer = Linear(256, 128).to("cuda", torch.bfloat16)
    layer.weight.data.normal_()
    layer(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16))
    layer(torch.randn(64, 256, device="cuda", dtype=torch.bfloat16))  # prefill-sized: cuBLAS
    assert calls == [4]
