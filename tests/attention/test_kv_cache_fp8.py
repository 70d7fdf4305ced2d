"""The FP8 KV cache in torch: quantization arithmetic, the store/read round trip, and the torch backend (the
oracle of the Triton kernels) with an FP8 cache against the same backend with a float cache."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm.attention.kv_quant import dequantize_kv, fp8_max, kv_scale_for, quantize_kv
from pagedllm.attention.torch_paged import TorchPagedAttention, gather_context, write_kv_cache
from tests.fp8 import FP8_DTYPES, quantized_copy
from tests.utils import make_metadata

# Relative rounding error of one FP8 value (half a step of its mantissa): e4m3 has 3 bits, e5m2 2.
RELATIVE_ROUNDING = {torch.float8_e4m3fn: 2**-4, torch.float8_e5m2: 2**-3}


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
def test_quantize_dequantize_round_trip_within_fp8_rounding(fp8_dtype: torch.dtype) -> None:
    x = 3 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
    scale = kv_scale_for(x, fp8_dtype)
    assert scale.dtype == torch.float32 and scale.item() == pytest.approx(x.abs().max().item() / fp8_max(fp8_dtype))
    stored = quantize_kv(x, scale, fp8_dtype)
    assert stored.dtype == fp8_dtype
    back = dequantize_kv(stored, scale, torch.float32)
    # Normal values: relative error; the smallest (subnormal in FP8) ones: an absolute floor.
    floor = scale.item() * torch.finfo(fp8_dtype).smallest_normal
    assert torch.all((back - x).abs() <= RELATIVE_ROUNDING[fp8_dtype] * x.abs() + floor)


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
def test_out_of_range_values_saturate_instead_of_becoming_nan_or_inf(fp8_dtype: torch.dtype) -> None:
    limit = fp8_max(fp8_dtype)
    stored = quantize_kv(torch.tensor([1e9, -1e9, 2 * limit, 1.0]), torch.tensor(1.0), fp8_dtype)
    assert stored.float().tolist() == [limit, -limit, limit, 1.0]


def test_scale_of_all_zero_keys_is_positive() -> None:
    scale = kv_scale_for(torch.zeros(4, 2), torch.float8_e4m3fn)
    assert scale.item() > 0
    assert torch.all(quantize_kv(torch.zeros(3), scale, torch.float8_e4m3fn).float() == 0)


def test_float_cache_ignores_scales() -> None:
    x = torch.randn(5)
    assert torch.equal(quantize_kv(x, torch.tensor(0.01), torch.float32), x)
    assert torch.equal(dequantize_kv(x, torch.tensor(0.01), torch.float32), x)


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
def test_store_then_gather_round_trip(fp8_dtype: torch.dtype) -> None:
    """write_kv_cache quantizes into the slots, gather_context + dequantize_kv give the values back within
    rounding, and slots not written are untouched."""
    block_size, num_blocks, heads, dim = 4, 6, 2, 8
    key, value = 2 * torch.randn(7, heads, dim), 0.5 * torch.randn(7, heads, dim)
    k_scale, v_scale = kv_scale_for(key, fp8_dtype), kv_scale_for(value, fp8_dtype)
    cache = torch.zeros(2, num_blocks, block_size, heads, dim, dtype=fp8_dtype)
    block_ids = torch.tensor([5, 2])  # a request's two blocks, out of order
    slots = torch.tensor([5 * block_size + i for i in range(4)] + [2 * block_size + i for i in range(3)])
    write_kv_cache(key, value, cache, slots, k_scale, v_scale)
    key_ctx, value_ctx = gather_context(cache, block_ids, 7)
    assert key_ctx.dtype == fp8_dtype
    assert torch.equal(key_ctx.float(), quantize_kv(key, k_scale, fp8_dtype).float())
    torch.testing.assert_close(dequantize_kv(key_ctx, k_scale, torch.float32), key,
                               rtol=RELATIVE_ROUNDING[fp8_dtype], atol=k_scale.item() * 2**-6)
    torch.testing.assert_close(dequantize_kv(value_ctx, v_scale, torch.float32), value,
                               rtol=RELATIVE_ROUNDING[fp8_dtype], atol=v_scale.item() * 2**-6)
    untouched = torch.ones(num_blocks, dtype=torch.bool)
    untouched[block_ids] = False
    assert torch.all(cache[:, untouched].float() == 0)


def _random_step(seed: int, block_size: int = 4, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16):
    """A float cache holding each request's prefix, and a step mixing a prefill, a chunk and decodes."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    batch = [(9, 9), (5, 17), (1, 23), (1, 6), (1, 40)]  # (query_len, seq_len)
    num_blocks = sum(-(-s // block_size) for _, s in batch) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim)
    tables, new_k, new_v = [], [], []
    for query_len, seq_len in batch:
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(table)
        k, v = 2 * torch.randn(seq_len, num_kv_heads, head_dim), torch.randn(seq_len, num_kv_heads, head_dim)
        for pos in range(seq_len - query_len):
            cache[0, table[pos // block_size], pos % block_size] = k[pos]
            cache[1, table[pos // block_size], pos % block_size] = v[pos]
        new_k.append(k[seq_len - query_len :])
        new_v.append(v[seq_len - query_len :])
    query = torch.randn(sum(q for q, _ in batch), num_heads, head_dim)
    metadata = make_metadata([q for q, _ in batch], [s for _, s in batch], tables, block_size)
    return query, torch.cat(new_k), torch.cat(new_v), cache, metadata


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
def test_torch_backend_fp8_cache_equals_float_cache_of_the_dequantized_values(fp8_dtype: torch.dtype) -> None:
    """The FP8 cache changes attention only by rounding K and V: the backend over the FP8 cache gives what it gives
    over a float cache holding dequantize(quantize(K, V)); and stays near the float cache's output."""
    query, key, value, cache, metadata = _random_step(seed=1)
    scale = 16**-0.5
    k_scale = kv_scale_for(torch.cat([cache[0].flatten(), key.flatten()]), fp8_dtype)
    v_scale = kv_scale_for(torch.cat([cache[1].flatten(), value.flatten()]), fp8_dtype)
    backend = TorchPagedAttention()

    fp8_cache = quantized_copy(cache, k_scale, v_scale, fp8_dtype)
    out_fp8 = backend.forward(query, key, value, fp8_cache, metadata, scale, k_scale, v_scale)
    rounded_cache = torch.stack([dequantize_kv(fp8_cache[0], k_scale, torch.float32),
                                 dequantize_kv(fp8_cache[1], v_scale, torch.float32)])
    rounded_key = dequantize_kv(quantize_kv(key, k_scale, fp8_dtype), k_scale, torch.float32)
    rounded_value = dequantize_kv(quantize_kv(value, v_scale, fp8_dtype), v_scale, torch.float32)
    out_rounded = backend.forward(query, rounded_key, rounded_value, rounded_cache, metadata, scale)
    torch.testing.assert_close(out_fp8, out_rounded, atol=1e-6, rtol=1e-5)

    out_float = backend.forward(query, key, value, cache.clone(), metadata, scale)
    tolerance = 4 * RELATIVE_ROUNDING[fp8_dtype]  # attention outputs are averages of V rows of magnitude ~1
    torch.testing.assert_close(out_fp8, out_float, atol=tolerance, rtol=tolerance)
    assert (out_fp8 - out_float).abs().max() > 0  # the cache did round


def test_torch_backend_without_scales_uses_one() -> None:
    query, key, value, cache, metadata = _random_step(seed=2)
    unit = torch.tensor(1.0)
    fp8_cache = quantized_copy(cache, unit, unit, torch.float8_e4m3fn)
    backend = TorchPagedAttention()
    expected = backend.forward(query, key, value, fp8_cache.clone(), metadata, 0.25, unit, unit)
    torch.testing.assert_close(backend.forward(query, key, value, fp8_cache, metadata, 0.25), expected)
