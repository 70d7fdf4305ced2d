"""Per-request block tables over the block pool: allocate slots on demand, free at once, find cached prefixes,
and move a preempted request's blocks to a CPU pool and back (swap)."""

from __future__ import annotations

from pagedllm.core.block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens
from pagedllm.core.request import Request


class KVCacheManager:
    """Maps each running request to the blocks that hold its KV cache."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, num_cpu_blocks: int = 0
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.cpu_pool = BlockPool(num_cpu_blocks) if num_cpu_blocks else None
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # hashes of the request's full blocks, in order
        self._swapped: dict[str, list[KVBlock]] = {}  # request id -> its blocks in the CPU pool
        self._pending_copies: list[tuple[int, int]] = []  # copy-on-write (source block, new block) of this step
        self._rewritten_tables: set[str] = set()  # requests whose block table changed other than by appending

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks that starts the request's tokens, and how many tokens it covers.

        At least the last token is always left to compute, since its logits are needed to sample.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        if request.pooling_params is not None and request.pooling_params.needs_every_position:
            return [], 0  # mean / first-token pooling reads every prompt position's hidden state: none is skipped
        tokens = request.all_token_ids
        max_cached_blocks = (len(tokens) - 1) // self.block_size
        hits: list[KVBlock] = []
        parent: BlockHash | None = None
        for index in range(max_cached_blocks):
            parent = hash_block_tokens(parent, tokens[index * self.block_size : (index + 1) * self.block_size],
                                       _extra_keys(request))
            block = self.pool.get_cached_block(parent)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Free blocks that ``allocate_slots(request, num_new_tokens)`` would take (ignoring prefix hits)."""
        num_tokens_after = request.num_computed_tokens + num_new_tokens
        return max(0, -(-num_tokens_after // self.block_size) - len(self._blocks.get(request.request_id, ())))

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of the request; return the new block ids, or None (and
        change nothing) when the pool has too few free blocks."""
        computed_blocks = computed_blocks or []
        blocks = self._blocks.setdefault(request.request_id, [])
        num_tokens_after = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_needed = -(-num_tokens_after // self.block_size) - len(blocks) - len(computed_blocks)
        shared_index = self._shared_block_to_write(request, blocks)
        # Cached blocks taken out of the free list are no longer available for new content.
        num_reclaimed = sum(1 for block in computed_blocks if block.ref_cnt == 0)
        if max(num_needed, 0) + num_reclaimed + (shared_index is not None) > self.pool.num_free_blocks:
            if not blocks:
                del self._blocks[request.request_id]
            return None
        if shared_index is not None:
            self._copy_on_write(request, blocks, shared_index)
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        new_blocks = self.pool.allocate(max(num_needed, 0))
        blocks.extend(new_blocks)
        self._hash_full_blocks(request, num_tokens_after)
        return [block.block_id for block in computed_blocks + new_blocks]

    # ---- sharing between sequences (parallel sampling) ---------------------------------------------------

    def fork(self, source: Request, child: Request, num_tokens: int) -> list[int]:
        """Give ``child`` the blocks holding ``source``'s first ``num_tokens`` tokens, shared (no copy); a shared
        block is copied only when one of them writes into it. Returns the child's block ids."""
        shared = self._blocks[source.request_id][: -(-num_tokens // self.block_size)]
        self.pool.touch(shared)
        self._blocks[child.request_id] = list(shared)
        self._hashes[child.request_id] = self._hashes.get(source.request_id, [])[: num_tokens // self.block_size]
        return [block.block_id for block in shared]

    def _shared_block_to_write(self, request: Request, blocks: list[KVBlock]) -> int | None:
        """Index of the block the request writes next if another request holds it too (it must be copied)."""
        index = request.num_computed_tokens // self.block_size
        if index < len(blocks) and blocks[index].ref_cnt > 1:
            return index
        return None

    def _copy_on_write(self, request: Request, blocks: list[KVBlock], index: int) -> None:
        (copy,) = self.pool.allocate(1)
        self._pending_copies.append((blocks[index].block_id, copy.block_id))
        self.pool.free([blocks[index]])
        blocks[index] = copy
        self._rewritten_tables.add(request.request_id)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write block copies decided since the last call (the runner makes them before the step)."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def take_rewritten_table(self, request_id: str) -> list[int] | None:
        """The request's whole block table if copy-on-write replaced one of its blocks since the last call."""
        if request_id not in self._rewritten_tables:
            return None
        self._rewritten_tables.discard(request_id)
        return self.get_block_ids(request_id)

    def free(self, request: Request) -> None:
        """Return the request's blocks to the pool, last block first (so it is evicted first)."""
        blocks = self._blocks.pop(request.request_id, [])
        self._hashes.pop(request.request_id, None)
        self._rewritten_tables.discard(request.request_id)
        self.pool.free(reversed(blocks))
        if request.request_id in self._swapped:
            self.cpu_pool.free(self._swapped.pop(request.request_id))

    def forget_hashes_from(self, request: Request, num_verified_tokens: int) -> None:
        """Make the request's blocks past its first ``num_verified_tokens`` tokens unfindable in the prefix cache: a
        step that failed may have left garbage in them."""
        blocks = self._blocks.get(request.request_id, [])
        self.pool.forget_hashes(blocks[num_verified_tokens // self.block_size :])

    def forget_block_hashes(self, block_ids: list[int]) -> None:
        """Make these device blocks unfindable in the prefix cache (their content is not trusted)."""
        self.pool.forget_hashes(self.pool.blocks[block_id] for block_id in block_ids)

    # ---- swap ----------------------------------------------------------------------------------------------

    def cpu_block_ids(self, request: Request) -> list[int]:
        """The CPU-pool blocks holding a swapped request's KV (empty when it is not swapped)."""
        return [block.block_id for block in self._swapped.get(request.request_id, ())]

    @property
    def cpu_usage(self) -> float:
        return self.cpu_pool.usage if self.cpu_pool else 0.0

    def can_swap_out(self, request: Request) -> bool:
        blocks = self._blocks.get(request.request_id, ())
        return self.cpu_pool is not None and 0 < len(blocks) <= self.cpu_pool.num_free_blocks

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Move the request's blocks to the CPU pool; return the (device block, CPU block) copies to make."""
        blocks = self._blocks[request.request_id]
        cpu_blocks = self.cpu_pool.allocate(len(blocks))
        mapping = [(block.block_id, cpu.block_id) for block, cpu in zip(blocks, cpu_blocks)]
        self.free(request)
        self._swapped[request.request_id] = cpu_blocks
        return mapping

    def num_swapped_blocks(self, request: Request) -> int:
        return len(self._swapped.get(request.request_id, ()))

    def swap_in(self, request: Request) -> list[tuple[int, int]]:
        """Bring a swapped request's blocks back to the device pool; return the (CPU block, device block) copies.
        The caller checks ``num_free_blocks`` first."""
        cpu_blocks = self._swapped.pop(request.request_id)
        blocks = self.pool.allocate(len(cpu_blocks))
        self._blocks[request.request_id] = blocks
        self._hash_full_blocks(request, request.num_computed_tokens)
        self.cpu_pool.free(cpu_blocks)
        return [(cpu.block_id, block.block_id) for cpu, block in zip(cpu_blocks, blocks)]

    def _hash_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Hash the blocks that will be full once ``num_tokens`` tokens are computed, as far as their token ids are
        known (a token still being sampled by a step in flight is not: its block is hashed by a later call)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        blocks = self._blocks[request.request_id]
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        if num_full <= len(hashes):
            return
        tokens = request.all_token_ids
        for index in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            block_hash = hash_block_tokens(parent, tokens[index * self.block_size : (index + 1) * self.block_size],
                                           _extra_keys(request))
            hashes.append(block_hash)
            self.pool.cache_full_block(blocks[index], block_hash)


def _extra_keys(request: Request) -> tuple[int, ...]:
    """What besides the tokens a block's KV depends on: the LoRA adapter (an adapter's KV differs from the base
    model's and every other adapter's for the same tokens)."""
    return (request.lora_request.lora_int_id,) if request.lora_request is not None else ()
