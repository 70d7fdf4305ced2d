"""Sort the (token, expert) pairs of a step by expert, each expert's run padded to a multiple of the GEMM's row
block, so that every row block of the grouped GEMM belongs to one expert (the idea of vLLM's
``moe_align_block_size``, here in a dozen torch ops).

Everything has a shape fixed by the number of pairs alone (not by how they route) and nothing syncs with the host:
the result can be computed inside a CUDA graph, where a replay routes differently every step. Blocks past the
padded total are marked by ``num_padded`` and the kernels return at once for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertBlocks:
    """The (token, slot) pairs of a step grouped into row blocks of one expert each.

    ``sorted_ids`` [capacity]: flat pair ids ``token * top_k + slot``, grouped by expert, each group padded with
    ``num_pairs`` (an id past every real one) to a multiple of ``block_m``; ``expert_ids`` [capacity // block_m]:
    the expert of each block; ``num_padded`` [1]: how many entries of ``sorted_ids`` are in use.
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    num_pairs: int
    block_m: int


def padded_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound of the padded total: each expert that gets a pair wastes at most ``block_m - 1`` rows, and at
    most ``min(num_pairs, num_experts)`` experts get one; rounded up to whole blocks."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_to_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the pairs of ``topk_ids`` [T, top_k] by expert into blocks of ``block_m`` rows (see ``ExpertBlocks``)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync to size its output
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded_counts.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    destination = (padded_ends - padded_counts)[sorted_experts] + rank_in_expert
    capacity = padded_capacity(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, destination, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=device)
    expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return ExpertBlocks(sorted_ids, expert_ids.to(torch.int32), padded_ends[-1:].to(torch.int32), num_pairs,
                        block_m)
