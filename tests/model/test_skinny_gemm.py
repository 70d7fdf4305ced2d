"""The skinny-GEMM kernel (``model/skinny_gemm.py``) against ``F.linear``, and its fused variants (an RMSNorm with
a residual add, or SiLU-and-mul, in the input prologue) against the torch ops they replace.

Without CUDA the kernel runs in Triton's interpreter on small float32 CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA it also runs compiled in bfloat16/float16 on the real layer shapes of Qwen3-0.6B and
Llama-3.1-8B, eagerly and replayed from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

skinny = pytest.importorskip("pagedllm.model.skinny_gemm")

from pagedllm import pdl
from pagedllm.model.linear import Linear
from pagedllm.model.layers import RMSNorm
from pagedllm.model.skinny_gemm import (
    SkinnyGemmConfig,
    gemm_add_rms_norm,
    rms_norm_gemm,
    silu_mul_gemm,
    skinny_gemm,
)
from pagedllm.model.split_k import arrival_counters

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
    assert not arrival_counters(x.device).any()


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


# ---- fused prologues: RMSNorm (+ residual add) and SiLU-and-mul --------------------------------------------------

# The fused inputs are rounded once more than a plain GEMM's (the normalized or activated row): twice the tolerance.
FUSED_RELATIVE_ERROR = {dtype: 2 * error for dtype, error in RELATIVE_ERROR.items()}


def norm_then_linear(x, residual, norm_weight, eps, weight, bias):
    """The torch path's result in float64 from the same inputs, and the new residual (``x + residual``, rounded to
    x's dtype as torch adds)."""
    summed = x if residual is None else x + residual
    s64 = summed.double()
    normed = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    return F.linear(normed, weight.double(), None if bias is None else bias.double()), summed


def assert_relative_error(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and torch.isfinite(out).all()
    error = (out.double() - expected).norm() / expected.norm()
    assert error < FUSED_RELATIVE_ERROR[out.dtype], f"relative error {error:.2e}"


def random_norm_problem(num_rows, n, k, dtype, has_bias, seed):
    x, weight, bias = random_problem(num_rows, n, k, dtype, has_bias, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    residual = (3 * torch.randn(num_rows, k, generator=generator)).to(DEVICE, dtype)
    norm_weight = (0.5 + torch.rand(k, generator=generator)).to(DEVICE, dtype)
    return x, residual, norm_weight, weight, bias


def check_rms_norm_gemm(num_rows, n, k, dtype, has_bias, has_residual, seed, config=None):
    x, residual, norm_weight, weight, bias = random_norm_problem(num_rows, n, k, dtype, has_bias, seed)
    residual = residual if has_residual else None
    out, new_residual = rms_norm_gemm(x, residual, norm_weight, 1e-6, weight, bias, config)
    expected, expected_residual = norm_then_linear(x, residual, norm_weight, 1e-6, weight, bias)
    assert out.dtype == x.dtype
    assert_relative_error(out, expected)
    assert torch.equal(new_residual, expected_residual)  # one rounding of the same sum: bit-exact
    assert has_residual or new_residual is x


def check_silu_mul_gemm(num_rows, n, k, dtype, has_bias, seed, config=None):
    generator = torch.Generator().manual_seed(seed)
    gate_up = (2 * torch.randn(num_rows, 2 * k, generator=generator)).to(DEVICE, dtype)
    _, weight, bias = random_problem(num_rows, n, k, dtype, has_bias, seed)
    activated = F.silu(gate_up[:, :k]) * gate_up[:, k:]  # the torch path, rounded as it rounds
    expected = F.linear(activated.double(), weight.double(), None if bias is None else bias.double())
    assert_relative_error(silu_mul_gemm(gate_up, weight, bias, config), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 2, 5, 16])
@pytest.mark.parametrize(("n", "k", "has_bias"), [(100, 37, True), (193, 300, False), (64, 256, True)])
def test_rms_norm_gemm_matches_norm_then_linear(dtype, num_rows: int, n: int, k: int, has_bias: bool) -> None:
    for has_residual in (True, False):  # (no residual: the first layer's input norm)
        check_rms_norm_gemm(num_rows, n, k, dtype, has_bias, has_residual, seed=num_rows * n + k)


@pytest.mark.parametrize("num_rows", [1, 3, 16])
def test_rms_norm_gemm_never_splits_k(num_rows: int) -> None:
    """A config that would split K still gives whole rows to each program: the norm needs the full row."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    check_rms_norm_gemm(num_rows, 70, 200, dtype, True, True, seed=5, config=SkinnyGemmConfig(16, 32, split_k=3))
    assert not arrival_counters(torch.device(DEVICE)).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 2, 5, 16])
@pytest.mark.parametrize(("n", "k", "has_bias"), [(100, 37, True), (193, 300, False), (64, 256, True)])
def test_silu_mul_gemm_matches_silu_and_mul_then_linear(dtype, num_rows: int, n: int, k: int, has_bias: bool) -> None:
    check_silu_mul_gemm(num_rows, n, k, dtype, has_bias, seed=num_rows + n + k)


@pytest.mark.parametrize("num_rows", [1, 16])
def test_silu_mul_gemm_splits_k(num_rows: int) -> None:
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    check_silu_mul_gemm(num_rows, 130, 512, dtype, True, seed=2, config=SkinnyGemmConfig(32, 64, split_k=4))
    assert not arrival_counters(torch.device(DEVICE)).any()


def test_fused_variants_reject_bad_shapes() -> None:
    weight = torch.empty(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="2 \\* K"):
        silu_mul_gemm(torch.empty(2, 32, device=DEVICE), weight)
    with pytest.raises(ValueError, match="rows"):
        rms_norm_gemm(torch.empty(17, 32, device=DEVICE), None, torch.ones(32, device=DEVICE), 1e-6, weight)


def check_gemm_add_rms_norm(num_rows, n, k, dtype, has_bias, seed, config=None):
    """Against the separate launches: the linear output in the dtype, its sum with the residual (rounded), and the
    torch RMSNorm of that sum."""
    x, weight, bias = random_problem(num_rows, n, k, dtype, has_bias, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    residual = (3 * torch.randn(num_rows, n, generator=generator)).to(DEVICE, dtype)
    norm = RMSNorm(n, 1e-6).to(DEVICE, dtype)
    norm.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
    normed, new_residual = gemm_add_rms_norm(x, weight, bias, residual, norm.weight, 1e-6, config)
    expected_residual = (F.linear(x.double(), weight.double(), None if bias is None else bias.double()).to(dtype)
                         + residual)
    assert new_residual.dtype == normed.dtype == dtype and new_residual.shape == normed.shape == (num_rows, n)
    assert_relative_error(new_residual, expected_residual.double())
    assert_relative_error(normed, norm._norm(new_residual).double())  # the norm of the sum the kernel wrote
    assert_relative_error(normed, norm._norm(expected_residual).double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 2, 5, 16])
@pytest.mark.parametrize(("n", "k", "has_bias"), [(100, 37, True), (193, 300, False), (64, 256, True),
                                                  (1500, 64, False)])  # rows of two norm blocks
def test_gemm_add_rms_norm_matches_linear_then_add_and_norm(dtype, num_rows: int, n: int, k: int,
                                                            has_bias: bool) -> None:
    check_gemm_add_rms_norm(num_rows, n, k, dtype, has_bias, seed=num_rows * n + k)


@pytest.mark.parametrize("num_rows", [1, 16])
def test_gemm_add_rms_norm_splits_k_and_resets_its_counters(num_rows: int) -> None:
    """Split K: the last slice of each row block writes its sum, the last row block normalizes; twice, so the
    second launch relies on the first having reset both counters."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    for _ in range(2):
        check_gemm_add_rms_norm(num_rows, 130, 512, dtype, True, seed=3, config=SkinnyGemmConfig(32, 64, split_k=4))
    assert not arrival_counters(torch.device(DEVICE)).any()
    assert not skinny._rows_done_counter(torch.device(DEVICE)).any()


def test_gemm_add_rms_norm_rejects_a_residual_of_another_shape() -> None:
    x, weight, _ = random_problem(2, 64, 32, torch.float32, False, seed=0)
    with pytest.raises(ValueError, match="residual"):
        gemm_add_rms_norm(x, weight, None, torch.zeros(3, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6)


# (N, K) of the projections a norm precedes (qkv, gate_up) and the down projection, Qwen3-0.6B then Llama-3.1-8B.
NORM_SHAPES = [(4096, 1024), (6144, 1024), (6144, 4096), (28672, 4096)]
DOWN_SHAPES = [(1024, 3072), (4096, 14336)]


@needs_cuda
@pytest.mark.parametrize(("n", "k"), NORM_SHAPES)
def test_real_shapes_rms_norm_gemm(n: int, k: int) -> None:
    for num_rows in (1, 4, 16):
        check_rms_norm_gemm(num_rows, n, k, torch.bfloat16, n == 4096, True, seed=n + num_rows)


@needs_cuda
@pytest.mark.parametrize(("n", "k"), DOWN_SHAPES)
def test_real_shapes_silu_mul_gemm(n: int, k: int) -> None:
    for num_rows in (1, 4, 16):
        check_silu_mul_gemm(num_rows, n, k, torch.bfloat16, False, seed=n + num_rows)


@needs_cuda
@pytest.mark.parametrize(("n", "k"), [(1024, 2048), (1024, 3072), (4096, 4096), (4096, 14336)])
def test_real_shapes_gemm_add_rms_norm(n: int, k: int) -> None:
    """The o and down projections of Qwen3-0.6B and Llama-3.1-8B, with the RMSNorm after them."""
    for num_rows in (1, 4, 16):
        check_gemm_add_rms_norm(num_rows, n, k, torch.bfloat16, False, seed=n + k + num_rows)


def test_pdl_is_never_on_outside_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.launch_options(torch.device("cpu")) == {"USE_PDL": 0}


@pytest.mark.parametrize(("value", "mode"), [(None, "start"), ("", "start"), ("1", "start"), ("START", "start"),
                                             ("late", "late"), ("0", "0")])
def test_pdl_mode_from_env(monkeypatch: pytest.MonkeyPatch, value: str | None, mode: str) -> None:
    """PDL is on by default (measured faster on an H200: pagedllm/pdl.py); ``PAGEDLLM_PDL`` picks the trigger or
    turns it off."""
    from pagedllm.config import pdl_mode_from_env

    if value is None:
        monkeypatch.delenv("PAGEDLLM_PDL", raising=False)
    else:
        monkeypatch.setenv("PAGEDLLM_PDL", value)
    assert pdl_mode_from_env() == mode


def test_pdl_mode_refuses_an_unknown_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.config import pdl_mode_from_env

    monkeypatch.setenv("PAGEDLLM_PDL", "early")
    with pytest.raises(ValueError, match="PAGEDLLM_PDL"):
        pdl_mode_from_env()


def test_pdl_refuses_an_unknown_trigger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "TRIGGER", "early")
    monkeypatch.setattr(pdl, "_has_grid_dependency_control", lambda index: True)
    with pytest.raises(ValueError, match="'start' or 'late'"):
        pdl.launch_options(torch.device("cuda", 0))


def _decode_layer_chain(x, residual, norm_weight, qkv, o, gate_up, down):
    """A decoder layer's four GEMMs back to back, each reading the one before's output and the residual stream
    written two launches earlier (what PDL must keep ordered)."""
    projected, residual = rms_norm_gemm(x, residual, norm_weight, 1e-6, qkv)
    attended = skinny_gemm(projected, o)  # N = 1024: K split, partials and counters
    gate_up_out, residual = rms_norm_gemm(attended, residual, norm_weight, 1e-6, gate_up)
    return silu_mul_gemm(gate_up_out, down), residual


@needs_cuda
@pytest.mark.parametrize("trigger", ["start", "late"])
def test_pdl_chain_in_a_cuda_graph_matches_plain_launches(monkeypatch: pytest.MonkeyPatch, trigger: str) -> None:
    """Dependent kernels launched with PDL (the next one placed after each one's wait, or after its main loop),
    eagerly and replayed from a graph, give what plain launches give."""
    dtype, hidden, generator = torch.bfloat16, 1024, torch.Generator().manual_seed(3)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, dtype)

    x, residual, norm_weight = randn(4, hidden), randn(4, hidden), 0.5 + randn(hidden).abs()
    weights = (randn(4096, hidden, scale=0.03), randn(hidden, 4096, scale=0.015), randn(6144, hidden, scale=0.03),
               randn(hidden, 3072, scale=0.02))
    monkeypatch.setattr(pdl, "ENABLED", False)
    plain = _decode_layer_chain(x, residual, norm_weight, *weights)
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "TRIGGER", trigger)
    assert pdl.launch_options(x.device).get("launch_pdl")  # an H100/H200: the chain below really uses PDL
    eager = _decode_layer_chain(x, residual, norm_weight, *weights)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _decode_layer_chain(x, residual, norm_weight, *weights)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for replayed, launched, reference in zip(captured, eager, plain, strict=True):
            assert torch.equal(replayed, launched)
            torch.testing.assert_close(launched, reference, atol=1e-2, rtol=1e-2)
