"""Block pool and KV cache manager: ref counts, free-list order, hashes, on-demand allocation, no leaks."""

import pytest

from pagedllm.core.block_pool import BlockPool, hash_block_tokens
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.params import SamplingParams


def make_request(request_id: str, num_prompt_tokens: int, **params) -> Request:
    return Request(
        request_id,
        list(range(1, num_prompt_tokens + 1)),
        SamplingParams(**params),
        sampling_seed=0,
        eos_token_ids=(0,),
        max_tokens=params.get("max_tokens") or 16,
    )


def test_allocate_and_free_keep_ref_counts_and_free_list():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)
    blocks += pool.allocate(1)
    pool.free(reversed(blocks))
    assert pool.num_free_blocks == 4
    pool.check_invariants()
    # Freed last-first: the head of the free list is the block freed first (the old tail block).
    assert pool.allocate(1)[0].block_id == blocks[-1].block_id


def test_over_allocation_and_double_free_raise():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.allocate(3)
    block = pool.allocate(1)[0]
    pool.free([block])
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([block])


def test_shared_block_is_freed_only_by_its_last_holder():
    pool = BlockPool(2)
    block = pool.allocate(1)[0]
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert pool.num_free_blocks == 1 and block.ref_cnt == 1
    pool.free([block])
    assert pool.num_free_blocks == 2
    pool.check_invariants()


def test_hash_is_chained_over_the_parent_and_stable():
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first == hash_block_tokens(None, [1, 2, 3, 4])  # deterministic across calls (and processes)
    assert hash_block_tokens(first, [5, 6]) != hash_block_tokens(None, [5, 6])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(None, [1, 2], extra_keys=["lora-a"]) != hash_block_tokens(None, [1, 2])
    assert len(first) == 32


def test_cached_free_block_keeps_its_hash_until_reused():
    pool = BlockPool(2)
    block = pool.allocate(1)[0]
    block_hash = hash_block_tokens(None, [7, 7])
    pool.cache_full_block(block, block_hash)
    pool.free([block])
    assert pool.get_cached_block(block_hash) is block  # still findable while free
    pool.allocate(2)  # reused for new content: the hash is forgotten
    assert pool.get_cached_block(block_hash) is None
    pool.check_invariants()


def test_manager_allocates_blocks_on_demand():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    request = make_request("a", 6)
    assert manager.allocate_slots(request, 6) is not None  # 6 tokens -> 2 blocks
    assert len(manager.get_block_ids("a")) == 2
    request.num_computed_tokens = 6
    assert manager.allocate_slots(request, 1) == []  # 7th token fits in block 2
    request.num_computed_tokens = 7
    assert manager.allocate_slots(request, 1) == []
    request.num_computed_tokens = 8
    assert len(manager.allocate_slots(request, 1)) == 1  # 9th token opens block 3
    manager.free(request)
    assert manager.num_free_blocks == 8
    manager.pool.check_invariants()


def test_manager_refuses_without_side_effects_when_full():
    manager = KVCacheManager(num_blocks=2, block_size=4)
    big = make_request("big", 12)
    assert manager.allocate_slots(big, 12) is None
    assert manager.num_free_blocks == 2 and manager.get_block_ids("big") == []
    manager.pool.check_invariants()


def test_full_blocks_get_chained_hashes():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    request = make_request("a", 9)
    manager.allocate_slots(request, 9)
    blocks = manager._blocks["a"]
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert blocks[0].block_hash == first
    assert blocks[1].block_hash == hash_block_tokens(first, [5, 6, 7, 8])
    assert blocks[2].block_hash is None  # partial block: content not final


def test_prefix_lookup_reuses_cached_blocks_when_enabled():
    manager = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = make_request("a", 10)
    manager.allocate_slots(first, 10)
    manager.free(first)
    second = make_request("b", 10)
    hits, num_cached = manager.get_computed_blocks(second)
    assert num_cached == 8 and len(hits) == 2
    assert manager.allocate_slots(second, 2, hits) is not None
    assert manager.get_block_ids("b")[:2] == [block.block_id for block in hits]
    manager.free(second)
    manager.pool.check_invariants()
    assert manager.num_free_blocks == 8
