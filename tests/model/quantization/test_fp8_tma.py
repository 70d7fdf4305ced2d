"""The TMA + wgmma W8A8 GEMM (``fp8_tma``) against the torch oracle of ``fp8_gemm``, and its dispatch.

In Triton's interpreter (no CUDA) the kernel runs on float32 CPU tensors with torch's FP8 casts
(``exact_fp8_casts``), so it must equal the oracle run on x rounded by torch's quantizer; with CUDA (sm90) it runs
compiled in bf16, and ``fp8_linear`` is checked across the dispatch's whole W8A8 range (17..512 rows).
"""

from __future__ import annotations

import pytest
import torch

fp8_tma = pytest.importorskip("pagedllm.model.quantization.fp8_tma")

from pagedllm.model.quantization import fp8_gemm
from pagedllm.model.quantization.fp8_gemm import fp8_linear, fp8_linear_reference, triton_path
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig
from tests.fp8 import exact_fp8_casts  # noqa: F401  (a fixture)
from tests.model.quantization.fp8_problems import (
    DTYPES,
    LLAMA_8B_SHAPES,
    RELATIVE_ERROR,
    assert_w8a8_linear_matches_oracle,
    fp8_rounded,
    needs_fp8_gpu,
    random_problem,
    relative_error,
    static_input_scale,
)

needs_hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
                                  reason="needs a GPU with TMA (sm90+)")
# (rows, N, K, config): N not a multiple of the block, K a multiple of 16 but not of BLOCK_K (TMA zero-fills the
# tail), uneven K splits, every BLOCK_M from 32 to 256.
CASES = [(17, 72, 304, None), (40, 130, 256, Fp8GemmConfig(64, 64, split_k=3, num_stages=3)),
         (64, 200, 208, Fp8GemmConfig(128, 32, split_k=2, num_stages=4)), (100, 48, 96, None),
         (256, 96, 160, Fp8GemmConfig(64, 64, split_k=2, num_warps=8, num_stages=2))]


@pytest.mark.usefixtures("exact_fp8_casts")
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("scheme", ["dynamic_token", "dynamic_tensor", "static"])
@pytest.mark.parametrize(("num_rows", "n", "k", "config"), CASES)
def test_tma_gemm_matches_oracle_on_fp8_rounded_x(per_tensor: bool, scheme: str, num_rows: int, n: int, k: int,
                                                  config: Fp8GemmConfig | None) -> None:
    dtype = DTYPES[0]
    x, weight, scale, bias = random_problem(num_rows, n, k, dtype, True, seed=num_rows + n, per_tensor=per_tensor)
    input_scale = static_input_scale(x, scheme)
    out = fp8_tma.fp8_w8a8_tma_gemm(x, weight, scale, bias, scheme, input_scale, config)
    assert out.dtype == dtype and out.shape == (num_rows, n)
    expected = fp8_linear_reference(fp8_rounded(x, scheme, input_scale), weight, scale, bias.float())
    assert relative_error(out, expected) < RELATIVE_ERROR[dtype]
    assert relative_error(out, fp8_linear_reference(x, weight, scale, bias)) < 5e-2


def test_split_k_is_repeatable() -> None:
    """Split launches leave the counters ready: twice the same result, bit for bit."""
    x, weight, scale, bias = random_problem(33, 72, 304, DTYPES[0], True, seed=7)
    config = Fp8GemmConfig(32, 32, split_k=4, num_stages=2)
    first = fp8_tma.fp8_w8a8_tma_gemm(x, weight, scale, bias, "dynamic_token", None, config)
    assert torch.equal(first, fp8_tma.fp8_w8a8_tma_gemm(x, weight, scale, bias, "dynamic_token", None, config))


def test_accepts_only_tma_aligned_shapes() -> None:
    x, weight, _, _ = random_problem(20, 32, 301, DTYPES[0], False, seed=1)  # K = 301: rows not 16-byte aligned
    assert not fp8_tma.accepts(x, weight)
    x, weight, _, _ = random_problem(fp8_tma.MAX_ROWS + 1, 32, 64, DTYPES[0], False, seed=1)
    assert not fp8_tma.accepts(x, weight) and fp8_tma.accepts(x[:fp8_tma.MAX_ROWS], weight)
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8_tma.fp8_w8a8_tma_gemm(x[:5, :60], weight[:, :60], torch.ones(32), None, "dynamic_token")


@pytest.mark.parametrize(("n", "k"), LLAMA_8B_SHAPES)
@pytest.mark.parametrize("num_rows", [17, 64, 128, 256])
def test_choose_config_covers_the_sms_evenly(n: int, k: int, num_rows: int, monkeypatch) -> None:
    """The estimate (without the swept shapes, which win by measurement even where uneven), on an H200's 132 SMs:
    the programs, dealt round-robin, finish within a third of a perfectly even deal of the weight's K steps (plus
    one program's fixed cost); slices long enough to pipeline; the ring fits."""
    monkeypatch.setattr(fp8_tma, "TUNED_CONFIGS", {})
    fp8_tma.choose_config.cache_clear()
    block_m = fp8_tma.block_m_for(num_rows)
    config = fp8_tma.choose_config(n, k, 132, block_m)
    fp8_tma.choose_config.cache_clear()
    row_blocks, k_steps = -(-n // config.block_n), -(-k // config.block_k)
    per_sm = -(-row_blocks * config.split_k // 132)
    finish = per_sm * (-(-k_steps // config.split_k) + fp8_tma._PIPELINE_FILL_STEPS)
    assert finish <= 1.35 * (row_blocks * k_steps / 132 + fp8_tma._PIPELINE_FILL_STEPS)
    assert k_steps // config.split_k >= 4
    assert 2 <= config.num_stages
    assert config.num_stages * fp8_tma.stage_bytes(config.block_n, block_m, config.block_k) <= 220 * 1024


def test_balanced_split_prefers_the_fewest_slices_among_equals() -> None:
    assert fp8_tma.balanced_split(264, 32, 132) == 1  # two full waves already
    assert fp8_tma.balanced_split(48, 32, 132) == 2  # 96 programs of 16 steps beat 144 of 11 (two waves)
    assert fp8_tma.balanced_split(1, 3, 132) == 1  # too short to split


def test_triton_path_takes_tma_between_the_fused_and_scaled_mm_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_gemm, "GEMV_MAX_ROWS", 1)
    monkeypatch.setattr(fp8_gemm, "FUSED_QUANT_MAX_ROWS", 16)
    monkeypatch.setattr(fp8_gemm, "TRITON_MAX_ROWS", 64)
    monkeypatch.setattr(fp8_gemm, "TMA_MAX_ROWS", 256)
    paths = [triton_path(m, "dynamic_token", tma=True) for m in (1, 16, 17, 256, 257)]
    assert paths == ["gemv", "w8a8_fused", "w8a8_tma", "w8a8_tma", None]
    assert triton_path(17, "dynamic_token", tma=False) == "w8a8" and triton_path(100, "static") is None
    assert triton_path(17, "none", tma=True) == "weight_only"  # weight-only never quantizes x
    monkeypatch.setattr(fp8_gemm, "TMA_MAX_ROWS", 0)
    assert triton_path(17, "dynamic_token", tma=True) == "w8a8"


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [17, 64, 128, 256])
@pytest.mark.parametrize(("n", "k"), LLAMA_8B_SHAPES)
def test_tma_gemm_real_shapes(num_rows: int, n: int, k: int) -> None:
    x, weight, scale, _ = random_problem(num_rows, n, k, torch.bfloat16, False, seed=n + num_rows)
    out = fp8_tma.fp8_w8a8_tma_gemm(x, weight, scale, None, "dynamic_token")
    expected = fp8_linear_reference(fp8_rounded(x, "dynamic_token", None), weight, scale, None)
    assert relative_error(out, expected) < RELATIVE_ERROR[torch.bfloat16]


@needs_hopper
@pytest.mark.gpu
def test_tma_gemm_in_a_cuda_graph() -> None:
    x, weight, scale, bias = random_problem(64, 4096, 4096, torch.bfloat16, True, seed=4)
    fp8_tma.fp8_w8a8_tma_gemm(x, weight, scale, bias, "dynamic_token")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_tma.fp8_w8a8_tma_gemm(x, weight, scale, bias, "dynamic_token")
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_tma.fp8_w8a8_tma_gemm(x, weight, scale, bias, "dynamic_token"))


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["dynamic_token", "dynamic_tensor", "static"])
@pytest.mark.parametrize(("num_rows", "n", "k"), [(17, 200, 304), (33, 130, 301), (64, 4096, 4096),
                                                  (129, 1000, 2048), (200, 72, 4000), (256, 6144, 4096),
                                                  (300, 512, 1024), (512, 1024, 3072)])
def test_fp8_linear_w8a8_range_matches_oracle(scheme: str, num_rows: int, n: int, k: int) -> None:
    """fp8_linear from 17 to 512 rows, whichever kernel serves (TMA on sm90 where K allows, fp8_triton for K = 301,
    _scaled_mm or the reference above): the oracle on FP8-rounded x, up to bf16 output rounding."""
    assert_w8a8_linear_matches_oracle(num_rows, n, k, scheme, per_tensor=num_rows % 2 == 1)


@needs_hopper
@pytest.mark.gpu
def test_fp8_linear_takes_the_tma_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_gemm, "TMA_MAX_ROWS", 256)
    x, weight, scale, bias = random_problem(100, 1024, 1024, torch.bfloat16, True, seed=5)
    assert torch.equal(fp8_linear(x, weight, scale, bias, "dynamic_token"),
                       fp8_tma.fp8_w8a8_tma_gemm(x, weight, scale, bias, "dynamic_token"))
