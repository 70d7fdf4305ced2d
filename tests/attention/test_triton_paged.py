"""The Triton paged-attention kernels against the pure-torch oracle, on random ragged batches.

On a machine without CUDA the kernels run in Triton's interpreter (float32 and half precision on CPU tensors);
with CUDA they run compiled, in bfloat16/float16 as served and in float32.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are decorated, i.e. before the module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton_paged = pytest.importorskip("pagedllm.attention.triton_paged")

from pagedllm.attention.torch_paged import TorchPagedAttention
from tests.utils import make_metadata

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_batch(rng: random.Random, max_reqs: int, max_context: int, decode_only: bool) -> list[tuple[int, int]]:
    """(query_len, seq_len) per request: decodes, fresh prefills, and prefill chunks over a cached prefix."""
    batch = []
    for _ in range(rng.randint(1, max_reqs)):
        kind = "decode" if decode_only else rng.choice(["decode", "prefill", "chunk"])
        if kind == "decode":
            batch.append((1, rng.randint(1, max_context)))
        elif kind == "prefill":
            query_len = rng.randint(1, 80)
            batch.append((query_len, query_len))
        else:
            query_len = rng.randint(1, 70)
            batch.append((query_len, query_len + rng.randint(1, max_context)))
    return batch


def build_case(batch, block_size, num_heads, num_kv_heads, head_dim, dtype, seed):
    """A paged cache holding each request's prefix (blocks shuffled, with holes), and the step's q/k/v."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for _, s in batch) + 5
    free = list(range(num_blocks))
    rng.shuffle(free)
    cache = torch.zeros((2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=DEVICE)
    tables, queries, new_k, new_v = [], [], [], []
    for query_len, seq_len in batch:
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(table)
        k = torch.randn(seq_len, num_kv_heads, head_dim, device=DEVICE).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, device=DEVICE).to(dtype)
        for pos in range(seq_len - query_len):
            cache[0, table[pos // block_size], pos % block_size] = k[pos]
            cache[1, table[pos // block_size], pos % block_size] = v[pos]
        queries.append(torch.randn(query_len, num_heads, head_dim, device=DEVICE).to(dtype))
        new_k.append(k[seq_len - query_len:])
        new_v.append(v[seq_len - query_len:])
    metadata = make_metadata([q for q, _ in batch], [s for _, s in batch], tables, block_size, device=DEVICE)
    return torch.cat(queries), torch.cat(new_k), torch.cat(new_v), cache, metadata


def check(batch, block_size=16, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, seed=0):
    query, key, value, cache, metadata = build_case(batch, block_size, num_heads, num_kv_heads, head_dim, dtype, seed)
    scale = head_dim**-0.5
    expected_cache = cache.clone()
    expected = TorchPagedAttention().forward(query, key, value, expected_cache, metadata, scale)
    out = triton_paged.TritonPagedAttention().forward(query, key, value, cache, metadata, scale)
    assert out.dtype == dtype and out.shape == query.shape
    assert torch.equal(cache, expected_cache)  # the store wrote exactly the same slots
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 2)])
def test_mixed_ragged_batches(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    for seed in range(3):
        batch = random_batch(random.Random(seed * 7 + block_size), 4, 150, decode_only=False)
        check(batch, block_size, num_heads, num_kv_heads, seed=seed)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 1), (8, 2), (7, 7)])
def test_decode_batches(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    for seed in range(3):
        batch = random_batch(random.Random(seed * 11 + block_size), 5, 300, decode_only=True)
        check(batch, block_size, num_heads, num_kv_heads, seed=seed)


def test_decode_splits_a_long_context() -> None:
    """One request with a long context is split into several slices, merged by log-sum-exp."""
    assert triton_paged.num_decode_splits(1, 2, 1000, torch.device(DEVICE)) > 1
    check([(1, 1000)], block_size=16, num_heads=4, num_kv_heads=2)
    check([(1, 1000), (1, 3), (1, 65)], block_size=32, num_heads=8, num_kv_heads=2)


def test_each_split_gets_at_least_min_tiles_per_split(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device(DEVICE)
    monkeypatch.setattr(triton_paged, "MIN_TILES_PER_SPLIT", 4)
    assert triton_paged.num_decode_splits(1, 8, 256, device) == 1  # 4 tiles of 64 keys: one run
    assert triton_paged.num_decode_splits(1, 8, 1024, device) == 4
    monkeypatch.setattr(triton_paged, "MIN_TILES_PER_SPLIT", 1)
    assert triton_paged.num_decode_splits(1, 8, 256, device) == 4


def test_other_head_dims() -> None:
    check([(9, 40), (1, 77)], head_dim=64)
    check([(5, 30), (1, 20)], head_dim=8, num_heads=8, num_kv_heads=4)  # padded to 16 columns (stories260K)
    check([(1, 100), (3, 9)], head_dim=80)  # not a power of two
    check([(1, 130), (1, 5)], head_dim=128, num_heads=8, num_kv_heads=2)


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="Triton's interpreter computes bfloat16 wrongly; checked compiled on CUDA")),
    torch.float16,
])
def test_half_precision(dtype: torch.dtype) -> None:
    check([(17, 40), (1, 90), (33, 33)], dtype=dtype, seed=1)
    check([(1, 200), (1, 7)], dtype=dtype, seed=2)


def test_padding_tokens_are_skipped_and_padding_requests_output_zero() -> None:
    """CUDA-graph padding: slot -1 leaves the cache alone; a request with seq_len 0 gets a zero output."""
    query, key, value, cache, metadata = build_case([(1, 20), (1, 1)], 16, 4, 2, 16, torch.float32, 0)
    metadata.slot_mapping[1] = -1
    metadata.seq_lens[1] = 0
    before = cache.clone()
    out = triton_paged.TritonPagedAttention().forward(query, key, value, cache, metadata, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    changed = (cache != before).flatten(2).any(-1)  # [2, blocks, slots] written
    assert int(changed.sum()) == 2  # only request 0's new K and V


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_key_and_value_none_means_already_stored(backend: str) -> None:
    """The fused rotary kernel stores K/V itself and passes None: the backend then attends to the cache as is."""
    query, key, value, cache, metadata = build_case([(1, 20), (5, 30), (1, 9)], 16, 4, 2, 16, torch.float32, 3)
    attention = TorchPagedAttention() if backend == "torch" else triton_paged.TritonPagedAttention()
    expected = attention.forward(query, key, value, cache, metadata, 0.25)  # stores, then attends
    before = cache.clone()
    out = attention.forward(query, None, None, cache, metadata, 0.25)
    assert torch.equal(cache, before)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
