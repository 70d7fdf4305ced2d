"""Rotary inside the decode kernel (``TritonPagedAttention.decode_with_rotary``): the kernel rotates q and the new
k (after Qwen3's per-head RMSNorm), stores k and v at their slots and attends, in one launch. Checked against the
torch path (``layers`` norms and ``apply_rotary``, then the torch attention oracle) and, over an FP8 cache, against
the two launches it replaces (``triton_ops.rotary_qk_store_kv``, then the backend with k and v stored).

Without CUDA the kernels run in Triton's interpreter (float32 and float16); with CUDA compiled, bfloat16 too.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm.attention.backend import DecodeRotary
from pagedllm.attention.torch_paged import TorchPagedAttention
from pagedllm.model.layers import RMSNorm, apply_rotary
from tests.attention.test_triton_paged import DEVICE, build_case, random_batch, triton_paged
from tests.fp8 import exact_fp8_casts, power_of_two_scale, quantized_copy  # noqa: F401 (fixture)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}
EPS = 1e-6


def rotary_tables(head_dim: int, max_position: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables [max_position, head_dim // 2], as RotaryEmbedding builds them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def norm_weights(head_dim: int, with_norm: bool, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not with_norm:
        return None, None
    generator = torch.Generator().manual_seed(seed)
    return tuple((1 + 0.3 * torch.randn(head_dim, generator=generator)).to(DEVICE) for _ in range(2))


def torch_rotated(x: torch.Tensor, weight: torch.Tensor | None, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """The torch path: the per-head RMSNorm (weight in x's dtype, as loaded), then rotary with the gathered rows."""
    if weight is not None:
        norm = RMSNorm(x.shape[-1], EPS).to(DEVICE, x.dtype)
        norm.weight.data.copy_(weight)
        x = norm._norm(x)
    return apply_rotary(x, cos[positions].to(x.dtype)[:, None, :], sin[positions].to(x.dtype)[:, None, :])


def decode_case(batch, num_heads, num_kv_heads, head_dim, dtype, with_norm, seed, block_size=16):
    query, key, value, cache, metadata = build_case(batch, block_size, num_heads, num_kv_heads, head_dim, dtype, seed)
    positions = (metadata.seq_lens.long() - 1).clamp(min=0)
    cos, sin = rotary_tables(head_dim)
    q_weight, k_weight = norm_weights(head_dim, with_norm, seed)
    if q_weight is not None:
        q_weight, k_weight = q_weight.to(dtype), k_weight.to(dtype)
    rotary = DecodeRotary(key, value, positions, cos, sin, q_weight, k_weight, EPS)
    return query, cache, metadata, rotary


def check(batch, num_heads=8, num_kv_heads=2, head_dim=16, dtype=torch.float32, with_norm=True, seed=0,
          block_size=16, sliding_window=0):
    query, cache, metadata, rotary = decode_case(batch, num_heads, num_kv_heads, head_dim, dtype, with_norm, seed,
                                                 block_size)
    q = torch_rotated(query, rotary.q_norm_weight, rotary.positions, rotary.cos, rotary.sin)
    k = torch_rotated(rotary.key, rotary.k_norm_weight, rotary.positions, rotary.cos, rotary.sin)
    expected_cache = cache.clone()
    scale = head_dim**-0.5
    expected = TorchPagedAttention().forward(q, k, rotary.value, expected_cache, metadata, scale,
                                             sliding_window=sliding_window)
    out = triton_paged.TritonPagedAttention().decode_with_rotary(query, rotary, cache, metadata, scale,
                                                                 sliding_window=sliding_window)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(cache.float(), expected_cache.float(), atol=tol, rtol=tol)  # the new k and v stored
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4), (6, 1)])
def test_matches_norm_rotary_then_attention(dtype, with_norm, num_heads, num_kv_heads) -> None:
    for seed in range(2):
        batch = random_batch(random.Random(seed * 5 + num_heads), 5, 300, decode_only=True)
        check(batch, num_heads, num_kv_heads, dtype=dtype, with_norm=with_norm, seed=seed)


def test_split_context_stores_once_and_reads_the_new_key() -> None:
    """Several splits: only the split holding the new position stores, and that split attends to the new key."""
    assert triton_paged.num_decode_splits(1, 2, 1000, torch.device(DEVICE)) > 1
    check([(1, 1000)])
    check([(1, 1000), (1, 1), (1, 65), (1, 64)], block_size=32, seed=3)


@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_other_head_dims(head_dim: int) -> None:
    check([(1, 100), (1, 9), (1, 257)], head_dim=head_dim, seed=head_dim)  # 80: padded to 128 columns


def test_sliding_window() -> None:
    check([(1, 300), (1, 20)], sliding_window=50, seed=4)


def test_padding_requests_store_nothing_and_output_zero() -> None:
    """CUDA-graph padding: slot -1 and seq_len 0 leave the cache alone and give a zero output."""
    query, cache, metadata, rotary = decode_case([(1, 20), (1, 1)], 4, 2, 16, torch.float32, True, 0)
    metadata.slot_mapping[1] = -1
    metadata.seq_lens[1] = 0
    before = cache.clone()
    out = triton_paged.TritonPagedAttention().decode_with_rotary(query, rotary, cache, metadata, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    changed = (cache != before).flatten(2).any(-1)  # [2, blocks, slots] written
    assert int(changed.sum()) == 2  # only request 0's new K and V


def test_strided_views_of_a_fused_qkv() -> None:
    """q, k and v as the model passes them: views into one [T, (H + 2 Hkv) D] projection output."""
    query, cache, metadata, rotary = decode_case([(1, 40), (1, 70)], 8, 2, 16, torch.float32, True, 1)
    qkv = torch.cat([query.flatten(1), rotary.key.flatten(1), rotary.value.flatten(1)], dim=1)
    q, k, v = (part.view(2, -1, 16) for part in qkv.split([128, 32, 32], dim=1))
    strided = DecodeRotary(k, v, rotary.positions, rotary.cos, rotary.sin, rotary.q_norm_weight,
                           rotary.k_norm_weight, EPS)
    backend = triton_paged.TritonPagedAttention()
    expected_cache = cache.clone()
    expected = backend.decode_with_rotary(query, rotary, expected_cache, metadata, 0.25)
    assert torch.equal(backend.decode_with_rotary(q, strided, cache, metadata, 0.25), expected)
    assert torch.equal(cache, expected_cache)


def test_fp8_cache_matches_the_two_launches_it_replaces(exact_fp8_casts) -> None:  # noqa: F811
    """Over an FP8 cache: the same stored bytes and the same output as rotary_qk_store_kv then the backend."""
    from pagedllm.model import triton_ops

    fp8_dtype = torch.float8_e4m3fn
    query, float_cache, metadata, rotary = decode_case([(1, 90), (1, 17), (1, 300)], 8, 2, 16, torch.float32,
                                                       True, 2)
    k_scale = power_of_two_scale(float_cache[0].flatten(), fp8_dtype).to(DEVICE)
    v_scale = power_of_two_scale(float_cache[1].flatten(), fp8_dtype).to(DEVICE)
    cache = quantized_copy(float_cache, k_scale, v_scale, fp8_dtype)
    expected_cache = cache.clone()
    backend = triton_paged.TritonPagedAttention()
    q = triton_ops.rotary_qk_store_kv(query, rotary.key, rotary.value, rotary.positions, rotary.cos, rotary.sin,
                                      rotary.q_norm_weight, rotary.k_norm_weight, EPS, expected_cache,
                                      metadata.slot_mapping, k_scale, v_scale)
    expected = backend.forward(q, None, None, expected_cache, metadata, 0.25, k_scale, v_scale)
    out = backend.decode_with_rotary(query, rotary, cache, metadata, 0.25, k_scale, v_scale)
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_refuses_prefill_steps() -> None:
    query, cache, metadata, rotary = decode_case([(1, 20)], 4, 2, 16, torch.float32, False, 0)
    metadata.max_query_len = 2
    with pytest.raises(ValueError, match="decode steps only"):
        triton_paged.TritonPagedAttention().decode_with_rotary(query, rotary, cache, metadata, 0.25)


class RecordingBackend:
    """Records which entry point ``layers.attend_rotated`` chose."""

    rotates_in_decode = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def decode_with_rotary(self, q, rotary, *args):
        self.calls.append("decode_with_rotary")
        return q

    def forward(self, q, k, v, *args, **kwargs):
        self.calls.append("forward")
        return q


@pytest.mark.parametrize(("max_query_len", "is_gathered", "rotary_in_decode", "switch", "expected"), [
    (1, False, True, True, "decode_with_rotary"),
    (1, False, False, True, "forward"),  # the caller declines (a quantized qkv projection)
    (1, False, True, False, "forward"),  # FUSE_ROTARY_INTO_DECODE off
    (1, True, True, True, "forward"),  # the torch rotary path (CPU)
    (7, False, True, True, "forward"),  # a prefill or mixed step
])
def test_attend_rotated_routes_only_fused_decode_steps(monkeypatch, max_query_len, is_gathered, rotary_in_decode,
                                                       switch, expected) -> None:
    from pagedllm.model import layers

    monkeypatch.setattr(layers, "FUSE_ROTARY_INTO_DECODE", switch)
    monkeypatch.setattr(layers, "rotate_qk_into_cache", lambda q, k, v, *args: (q, None, None))
    monkeypatch.setattr(layers, "rotate_qk", lambda q, k, *args: (q, k))
    query, cache, metadata, rotary = decode_case([(1, 20)], 4, 2, 16, torch.float32, False, 0)
    metadata.max_query_len = max_query_len
    rope = layers.RotaryStep(rotary.positions, rotary.cos, rotary.sin, is_gathered)
    backend = RecordingBackend()
    layers.attend_rotated(backend, query, rotary.key, rotary.value, rope, None, None, cache, metadata, 0.25,
                          rotary_in_decode=rotary_in_decode)
    assert backend.calls == [expected]
