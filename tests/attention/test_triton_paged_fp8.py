"""The Triton paged-attention kernels over an FP8 KV cache against the torch oracle over the same cache.

Without CUDA the kernels run in Triton's interpreter (float32 queries; float -> FP8 casts through torch, see
tests/fp8.py); with CUDA they run compiled, with bfloat16 queries as served too. The store must write the oracle's
bytes exactly (power-of-two scales make the division exact on both sides), the attention outputs must match the
oracle's within the float tolerance of the queries' dtype.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm.attention.torch_paged import TorchPagedAttention
from tests.attention.test_triton_paged import DEVICE, build_case, random_batch, triton_paged
from tests.fp8 import FP8_DTYPES, exact_fp8_casts, power_of_two_scale, quantized_copy  # noqa: F401 (fixture)

QUERY_DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def check_fp8(batch, fp8_dtype, block_size=16, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32,
              seed=0, scales=None):
    """Store + attention of one step over an FP8 cache: Triton against torch, same cache bytes, close outputs."""
    query, key, value, float_cache, metadata = build_case(batch, block_size, num_heads, num_kv_heads, head_dim,
                                                          dtype, seed)
    if scales is None:  # near max |x| / FP8 max, as calculate_kv_scales would set them
        scales = (power_of_two_scale(torch.cat([float_cache[0].flatten(), key.flatten()]), fp8_dtype),
                  power_of_two_scale(torch.cat([float_cache[1].flatten(), value.flatten()]), fp8_dtype))
    k_scale, v_scale = (s.to(DEVICE) for s in scales)
    cache = quantized_copy(float_cache, k_scale, v_scale, fp8_dtype)
    expected_cache = cache.clone()
    scale = head_dim**-0.5
    expected = TorchPagedAttention().forward(query, key, value, expected_cache, metadata, scale, k_scale, v_scale)
    out = triton_paged.TritonPagedAttention().forward(query, key, value, cache, metadata, scale, k_scale, v_scale)
    assert out.dtype == dtype and out.shape == query.shape
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))  # the store wrote the same bytes
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads", [(16, 8, 2), (4, 4, 4), (128, 6, 2)])
def test_mixed_ragged_batches(exact_fp8_casts: None, fp8_dtype: torch.dtype, block_size: int, num_heads: int,
                              num_kv_heads: int) -> None:
    batch = random_batch(random.Random(block_size), 4, 150, decode_only=False)
    check_fp8(batch, fp8_dtype, block_size, num_heads, num_kv_heads, seed=1)


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
def test_decode_batches_and_a_split_long_context(exact_fp8_casts: None, fp8_dtype: torch.dtype) -> None:
    check_fp8(random_batch(random.Random(5), 5, 300, decode_only=True), fp8_dtype, 16, 8, 2, seed=2)
    assert triton_paged.num_decode_splits(1, 2, 1000, torch.device(DEVICE)) > 1
    check_fp8([(1, 1000), (1, 3), (1, 65)], fp8_dtype, block_size=32, num_heads=8, num_kv_heads=2, seed=3)


@pytest.mark.parametrize("dtype", QUERY_DTYPES)
def test_query_dtypes_and_head_dims(exact_fp8_casts: None, dtype: torch.dtype) -> None:
    check_fp8([(9, 40), (1, 77)], torch.float8_e4m3fn, head_dim=64, dtype=dtype, seed=4)
    check_fp8([(5, 30), (1, 20)], torch.float8_e4m3fn, head_dim=8, num_heads=8, num_kv_heads=4, dtype=dtype)


def test_scales_that_saturate_and_scales_of_one(exact_fp8_casts: None) -> None:
    """Scale 1.0 (no checkpoint scales) and a scale so small that values saturate: still the oracle's bytes."""
    one = torch.tensor(1.0)
    check_fp8([(7, 20), (1, 50)], torch.float8_e4m3fn, scales=(one, one), seed=5)
    check_fp8([(7, 20), (1, 50)], torch.float8_e4m3fn, scales=(torch.tensor(2.0**-8), one), seed=6)


def test_fp8_cache_without_scales_reads_as_scale_one(exact_fp8_casts: None) -> None:
    query, key, value, float_cache, metadata = build_case([(1, 20), (4, 9)], 16, 4, 2, 16, torch.float32, 7)
    one = torch.tensor(1.0, device=DEVICE)
    cache = quantized_copy(float_cache, one, one, torch.float8_e4m3fn)
    attention = triton_paged.TritonPagedAttention()
    expected = attention.forward(query, key, value, cache.clone(), metadata, 0.25, one, one)
    torch.testing.assert_close(attention.forward(query, key, value, cache, metadata, 0.25), expected)


@pytest.mark.skipif(DEVICE != "cuda", reason="rounding of arbitrary scales compared on the GPU's own division")
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
def test_arbitrary_scales_on_the_gpu(fp8_dtype: torch.dtype) -> None:
    """Scales that are not powers of two (the division may round differently): outputs still match the oracle."""
    query, key, value, float_cache, metadata = build_case([(33, 90), (1, 300), (1, 17)], 16, 8, 2, 128,
                                                          torch.bfloat16, 8)
    k_scale = torch.tensor(0.0137, device=DEVICE)
    v_scale = torch.tensor(0.0071, device=DEVICE)
    cache = quantized_copy(float_cache, k_scale, v_scale, fp8_dtype)
    expected_cache = cache.clone()
    expected = TorchPagedAttention().forward(query, key, value, expected_cache, metadata, 0.1, k_scale, v_scale)
    out = triton_paged.TritonPagedAttention().forward(query, key, value, cache, metadata, 0.1, k_scale, v_scale)
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
    differs = cache.view(torch.uint8) != expected_cache.view(torch.uint8)
    assert differs.float().mean() < 1e-3  # at most a rare one-step rounding difference
