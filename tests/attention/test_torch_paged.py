"""TorchPagedAttention against a dense causal reference on contiguous K/V, over random ragged batches."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm.attention.backend import get_attention_backend
from pagedllm.attention.torch_paged import TorchPagedAttention
from tests.utils import make_metadata


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(Q K^T) V in float64, queries being the last positions; [q, H, D] x [k, H_kv, D] -> [q, H, D]."""
    num_queries, num_heads, _ = q.shape
    num_keys, num_kv_heads, _ = k.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    mask = torch.ones(num_queries, num_keys, dtype=torch.bool).tril(diagonal=num_keys - num_queries)
    for h in range(num_heads):
        kv_head = h // (num_heads // num_kv_heads)
        scores = (q[:, h].double() @ k[:, kv_head].double().T) * scale
        scores[~mask] = float("-inf")
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, kv_head].double()
    return out


def random_batch(rng: random.Random, max_reqs: int = 5) -> list[tuple[int, int]]:
    """(query_len, seq_len) per request: decodes, fresh prefills, and prefill chunks over a cached prefix."""
    batch = []
    for _ in range(rng.randint(1, max_reqs)):
        kind = rng.choice(["decode", "prefill", "chunk"])
        if kind == "decode":
            seq_len = rng.randint(1, 40)
            batch.append((1, seq_len))
        elif kind == "prefill":
            query_len = rng.randint(1, 24)
            batch.append((query_len, query_len))
        else:
            query_len = rng.randint(1, 20)
            batch.append((query_len, query_len + rng.randint(1, 30)))
    return batch


def run_case(batch: list[tuple[int, int]], block_size: int, num_heads: int, num_kv_heads: int,
             dtype: torch.dtype, seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    head_dim = 8
    num_blocks = sum(-(-s // block_size) for _, s in batch) + 7  # spare blocks stay untouched
    free = list(range(num_blocks))
    rng.shuffle(free)  # block tables out of order and with holes
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)

    tables, full_k, full_v, queries = [], [], [], []
    for query_len, seq_len in batch:
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(table)
        k = torch.randn(seq_len, num_kv_heads, head_dim).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim).to(dtype)
        full_k.append(k)
        full_v.append(v)
        queries.append(torch.randn(query_len, num_heads, head_dim).to(dtype))
        for pos in range(seq_len - query_len):  # the cached prefix, as earlier steps would have written it
            cache[0, table[pos // block_size], pos % block_size] = k[pos]
            cache[1, table[pos // block_size], pos % block_size] = v[pos]

    query_lens = [q for q, _ in batch]
    seq_lens = [s for _, s in batch]
    metadata = make_metadata(query_lens, seq_lens, tables, block_size)
    new_k = torch.cat([k[s - q:] for k, (q, s) in zip(full_k, batch)])
    new_v = torch.cat([v[s - q:] for v, (q, s) in zip(full_v, batch)])
    scale = head_dim**-0.5
    out = TorchPagedAttention().forward(torch.cat(queries), new_k, new_v, cache, metadata, scale)

    assert out.shape == (sum(query_lens), num_heads, head_dim) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    start = 0
    for i, (query_len, seq_len) in enumerate(batch):
        expected = dense_reference(queries[i], full_k[i], full_v[i], scale)
        torch.testing.assert_close(out[start:start + query_len].double(), expected, atol=tol, rtol=tol)
        start += query_len
        for pos in range(seq_len):  # every slot of the request holds its token's K/V
            block, offset = tables[i][pos // block_size], pos % block_size
            assert torch.equal(cache[0, block, offset], full_k[i][pos])
            assert torch.equal(cache[1, block, offset], full_v[i][pos])
    for block in free:  # blocks no request owns were not written
        assert cache[:, block].isnan().all()


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_random_ragged_batches(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    for seed in range(8):
        batch = random_batch(random.Random(seed * 100 + block_size))
        run_case(batch, block_size, num_heads, num_kv_heads, torch.float32, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    run_case([(5, 21), (1, 9), (12, 12)], 4, 8, 2, dtype, seed=3)


def test_edge_shapes() -> None:
    run_case([(1, 1)], 16, 4, 2, torch.float32, seed=0)  # first token of a request
    run_case([(16, 16), (1, 17)], 16, 4, 2, torch.float32, seed=1)  # exactly full block; decode opening a new one
    run_case([(3, 33)], 16, 4, 4, torch.float32, seed=2)  # chunk crossing into a partial third block


def test_registry_returns_torch_backend() -> None:
    assert isinstance(get_attention_backend("torch"), TorchPagedAttention)


@pytest.mark.parametrize("max_gathered", [1 << 18, 40])  # one chunk, and many small chunks
def test_large_decode_batches_are_attended_together_and_exactly(monkeypatch, max_gathered):
    """Many decodes of very different lengths, next to a prefill chunk, through the batched decode path."""
    monkeypatch.setattr("pagedllm.attention.torch_paged._MAX_GATHERED_TOKENS", max_gathered)
    rng = random.Random(7)
    batch = [(1, rng.randint(1, 70)) for _ in range(24)]
    batch.insert(5, (9, 30))
    run_case(batch, block_size=4, num_heads=8, num_kv_heads=2, dtype=torch.float32, seed=3)
