"""Sliding-window attention and attention logit soft-capping: the torch oracle against a direct computation, and
the Triton prefill / decode kernels against the oracle (Triton's interpreter without CUDA, compiled with it)."""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

from pagedllm.attention.torch_paged import TorchPagedAttention, causal_attention
from tests.attention.test_triton_paged import DEVICE, build_case, random_batch

triton_paged = pytest.importorskip("pagedllm.attention.triton_paged")


def test_oracle_window_equals_attention_over_the_last_keys() -> None:
    """A query at p with window w attends exactly as full causal attention over keys (p - w, p]."""
    torch.manual_seed(0)
    query, key, value = torch.randn(7, 4, 16), torch.randn(30, 2, 16), torch.randn(30, 2, 16)
    out = causal_attention(query, key, value, 0.25, sliding_window=5)
    for j in range(7):
        pos = 30 - 7 + j
        expected = causal_attention(query[j : j + 1], key[pos - 4 : pos + 1], value[pos - 4 : pos + 1], 0.25)
        torch.testing.assert_close(out[j : j + 1], expected, atol=1e-6, rtol=1e-6)


def test_oracle_soft_cap_is_tanh_of_the_scaled_scores() -> None:
    torch.manual_seed(1)
    query, key, value = torch.randn(3, 2, 8) * 4, torch.randn(9, 2, 8) * 4, torch.randn(9, 2, 8)
    scores = torch.einsum("qhd,khd->hqk", query, key) * 0.5
    scores = torch.tanh(scores / 3.0) * 3.0
    causal = torch.arange(9)[None, :] <= (torch.arange(3) + 6)[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    expected = torch.einsum("hqk,khd->qhd", probs, value)
    torch.testing.assert_close(causal_attention(query, key, value, 0.5, logits_soft_cap=3.0), expected)


def test_oracle_decode_path_equals_prefill_path() -> None:
    """The batched decode path and the per-request path of the oracle agree under a window and a cap."""
    batch = [(1, 40), (1, 7), (1, 33)]
    query, key, value, cache, metadata = build_case(batch, 4, 4, 2, 16, torch.float32, 5)
    out = TorchPagedAttention().forward(query, key, value, cache, metadata, 0.25, sliding_window=6,
                                        logits_soft_cap=2.0)
    for i, (_, seq_len) in enumerate(batch):
        table = metadata.block_tables[i].long()
        k = cache[0, table].reshape(-1, 2, 16)[:seq_len]
        v = cache[1, table].reshape(-1, 2, 16)[:seq_len]
        expected = causal_attention(query[i : i + 1], k, v, 0.25, sliding_window=6, logits_soft_cap=2.0)
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-6, rtol=1e-6)


def check(batch, window: int, cap: float, block_size=16, num_heads=4, num_kv_heads=2, head_dim=16,
          dtype=torch.float32, seed=0) -> None:
    query, key, value, cache, metadata = build_case(batch, block_size, num_heads, num_kv_heads, head_dim, dtype, seed)
    query = query * 3  # larger logits, so that the soft cap bites
    expected_cache = cache.clone()
    expected = TorchPagedAttention().forward(query, key, value, expected_cache, metadata, head_dim**-0.5,
                                             sliding_window=window, logits_soft_cap=cap)
    out = triton_paged.TritonPagedAttention().forward(query, key, value, cache, metadata, head_dim**-0.5,
                                                      sliding_window=window, logits_soft_cap=cap)
    assert torch.equal(cache, expected_cache)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [1, 5, 64, 100])
@pytest.mark.parametrize("cap", [0.0, 2.5])
def test_triton_mixed_batches(window: int, cap: float) -> None:
    """Prefills, chunks over a cached prefix and decodes; windows shorter and longer than a key tile."""
    for seed in range(2):
        batch = random_batch(random.Random(seed * 13 + window), 4, 200, decode_only=False)
        check(batch, window, cap, block_size=8, num_heads=8, num_kv_heads=2, seed=seed)


@pytest.mark.parametrize("window", [3, 70])
def test_triton_decode_with_splits(window: int) -> None:
    """Long contexts: the decode splits cover only the window; short ones sit inside it."""
    assert triton_paged.num_decode_splits(1, 2, 1000, torch.device(DEVICE)) > 1
    check([(1, 1000)], window, 0.0)
    check([(1, 1000), (1, 3), (1, 65), (1, 129)], window, 4.0, block_size=32, num_heads=8, num_kv_heads=2)


def test_triton_cap_without_window_and_global_layers_unchanged() -> None:
    check([(17, 40), (1, 90), (33, 33)], 0, 1.5, seed=1)
    check([(17, 40), (1, 90), (33, 33)], 0, 0.0, seed=1)


@pytest.mark.skipif(DEVICE == "cpu", reason="half precision checked compiled on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_on_gpu(dtype: torch.dtype) -> None:
    check([(17, 300), (1, 900), (64, 64)], 128, 50.0, dtype=dtype, seed=2)
    check([(1, 2000), (1, 7)], 512, 0.0, dtype=dtype, seed=3)
