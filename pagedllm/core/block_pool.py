"""The pool of fixed-size KV blocks: ref counts, a free list in eviction order, and content hashes for sharing.

A block whose ref count drops to 0 goes to the tail of the free list but keeps its content hash, so a later request
with the same prefix can take it back (prefix caching); blocks are reused for new content from the head of the
free list, least recently freed first, and only then lose their hash.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BlockHash = bytes


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: Sequence[int | str] = ()
) -> BlockHash:
    """Content hash of a full block, chained over its parent so equal hashes mean equal whole prefixes.

    sha256 over a fixed binary encoding (parent digest, little-endian int64 token ids, then any extra keys such
    as an adapter id): collision-resistant and stable across processes and Python versions, unlike ``hash()``.
    """
    digest = hashlib.sha256(parent_hash or b"\x00" * 32)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key in extra_keys:
        digest.update(repr(key).encode())
    return digest.digest()


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of the paged KV cache: ``block_size`` token slots in every layer's cache tensor."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and its content known


class BlockPool:
    """Owns every KV block; hands out free ones and takes them back."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"The KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # block_id -> block, in eviction order (head = least recently freed); O(1) removal from the middle.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self.num_shared_blocks = 0  # blocks held by more than one request

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take ``num_blocks`` blocks for new content; the caller checks ``num_free_blocks`` first."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"Asked for {num_blocks} blocks with only {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._forget_hash(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference to each block; blocks nobody holds go to the tail of the free list.

        Pass a request's blocks last-first so its tail blocks (least likely to be shared) are evicted first.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"Block {block.block_id} freed more often than it was taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 1:
                self.num_shared_blocks -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Record the content hash of a block that just became full, making it findable by that hash."""
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference to blocks found by hash, pulling free ones out of the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            elif block.ref_cnt == 1:
                self.num_shared_blocks += 1
            block.ref_cnt += 1

    def forget_hashes(self, blocks: Iterable[KVBlock]) -> None:
        """Drop the content hashes of blocks whose content is not trusted, so no prefix lookup finds them."""
        for block in blocks:
            self._forget_hash(block)

    def _forget_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None

    def check_invariants(self) -> None:
        """Raise AssertionError when the pool's bookkeeping is inconsistent (used by tests after every step)."""
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"block {block.block_id} has ref_cnt {block.ref_cnt}"
            assert (block.ref_cnt == 0) == (block.block_id in self._free), f"block {block.block_id} free-list mismatch"
        assert self.num_shared_blocks == sum(block.ref_cnt > 1 for block in self.blocks), "shared-block count"
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, f"block {block.block_id} hash map mismatch"
