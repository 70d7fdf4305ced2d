"""The LoRA delta of one linear layer: ``y += B[slot] (A[slot] x)`` for each token, by the adapter slot of its request.

Every adapter-capable layer (qkv, o, gate_up, down) gets a ``LoRALayerWeights`` holding its slice of the slot pool:
A stacked over shards ``[slots, num_shards * r_max, in]`` (one shrink for q, k and v together) and B
``[slots, out, r_max]`` whose rows are the shards' outputs; ranks below r_max and absent modules are zeros, so they
add nothing. The delta is added after the layer's own product, whatever its quantization method.

Which slot each token uses is the step's ``LoRAStepContext``, shared by all layers: for the Triton kernels (CUDA),
fixed device buffers of the step's tokens sorted by slot and the tiles over them (``punica.step_tiles``; CUDA
graphs replay with each step's), else a device buffer of each token's slot (-1 = the base model, no delta) and, for
the torch path, the token indices of each slot in the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class LoRAStepContext:
    """This step's token -> adapter slot mapping, shared by every LoRA layer of the model."""

    token_slots: torch.Tensor  # [max_num_tokens] int32 on the device: the step's first T entries are read
    use_kernels: bool  # Triton shrink / expand (CUDA) over ``tiles``; else the torch path below
    is_active: bool = False  # some token of the step has an adapter (kernels always run inside CUDA graphs)
    # Torch path: (slot, token indices) of each slot the step uses; None = mask over all slots (device-only data).
    groups: list[tuple[int, torch.Tensor]] | None = field(default_factory=list)
    # Kernels: the step's token indices sorted by slot and its tiles (rows slot, start, end), device buffers.
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None
    # Kernels in a CUDA graph capture: the stream the shrink runs on, beside the base GEMM (None: after it).
    side_stream: torch.cuda.Stream | None = None


class LoRALayerWeights:
    """One layer's adapter slots and the shards of its output (one shard for a plain layer)."""

    def __init__(self, num_slots: int, max_rank: int, input_size: int, shard_sizes: list[int],
                 context: LoRAStepContext, dtype: torch.dtype, device: torch.device) -> None:
        self.max_rank = max_rank
        self.shard_sizes = list(shard_sizes)
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.max_shard_size = max(shard_sizes)
        self.context = context
        self.a = torch.zeros(num_slots, len(shard_sizes) * max_rank, input_size, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, sum(shard_sizes), max_rank, dtype=dtype, device=device)
        # For the expand kernel: where each shard's rows start and how many it has.
        self.shard_offsets_gpu = torch.tensor(self.shard_offsets, dtype=torch.int32, device=device)
        self.shard_sizes_gpu = torch.tensor(self.shard_sizes, dtype=torch.int32, device=device)

    def clear_slot(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def set_shard(self, slot: int, shard: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Write one module's A [r, in] and (scaled) B [out_shard, r] into ``slot`` (ranks below r_max pad with 0)."""
        rank = lora_a.shape[0]
        first_row = shard * self.max_rank
        self.a[slot, first_row : first_row + rank].copy_(lora_a, non_blocking=True)
        offset = self.shard_offsets[shard]
        self.b[slot, offset : offset + self.shard_sizes[shard], :rank].copy_(lora_b, non_blocking=True)

    def apply(self, x: torch.Tensor, base_product: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The layer's output: ``base_product()`` (its own product of x) plus the delta. Captured into a CUDA graph,
        the shrink (which needs only x) is a branch beside the base GEMM on the side stream, joined before the
        expand: off the critical path of a decode step, where each of the 4 per layer cost a few microseconds."""
        side_stream = self.context.side_stream
        if not (self.context.use_kernels and side_stream is not None and torch.cuda.is_current_stream_capturing()):
            y = base_product()
            self.add_delta(x, y)
            return y
        from pagedllm.lora import punica

        sorted_tokens, tiles = self.context.tiles
        x = x if x.stride(-1) == 1 else x.contiguous()
        main_stream = torch.cuda.current_stream()
        side_stream.wait_stream(main_stream)
        with torch.cuda.stream(side_stream):
            u = punica.shrink(x, self.a, sorted_tokens, tiles)
        y = base_product()
        main_stream.wait_stream(side_stream)
        punica.expand(y, u, self.b, sorted_tokens, tiles, self.shard_offsets_gpu, self.shard_sizes_gpu, self.max_rank,
                      self.max_shard_size)
        return y

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[t] += B[slot_t] A[slot_t] x[t]`` for every token t with a slot (in place)."""
        context = self.context
        if not context.is_active:
            return
        if context.use_kernels:
            from pagedllm.lora import punica

            sorted_tokens, tiles = context.tiles
            punica.add_lora(y, x, self.a, self.b, sorted_tokens, tiles, self.shard_offsets_gpu, self.shard_sizes_gpu,
                            self.max_rank, self.max_shard_size)
        elif context.groups is None:
            add_lora_masked(y, x, self.a, self.b, context.token_slots[: x.shape[0]], self.shard_offsets,
                            self.shard_sizes, self.max_rank)
        else:
            add_lora_grouped(y, x, self.a, self.b, context.groups, self.shard_offsets, self.shard_sizes,
                             self.max_rank)


def add_lora_grouped(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     groups: list[tuple[int, torch.Tensor]], shard_offsets: list[int], shard_sizes: list[int],
                     max_rank: int) -> None:
    """The reference: for each slot of the step, the GEMMs of its tokens (gathered), added back into y."""
    for slot, token_indices in groups:
        x_slot = x.index_select(0, token_indices)
        shrunk = x_slot @ a[slot].t()  # [n, num_shards * r_max]
        delta = torch.cat([_expand_shard(shrunk, b[slot], shard, offset, size, max_rank)
                           for shard, (offset, size) in enumerate(zip(shard_offsets, shard_sizes))], dim=1)
        y.index_add_(0, token_indices, delta.to(y.dtype))


def add_lora_masked(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
                    shard_offsets: list[int], shard_sizes: list[int], max_rank: int) -> None:
    """The same from device data only (CUDA graphs without Triton): every slot over every token, masked; costs
    ``num_slots`` times the work, a fallback."""
    for slot in range(a.shape[0]):
        mask = (token_slots == slot).to(x.dtype).unsqueeze(1)
        shrunk = (x * mask) @ a[slot].t()
        for shard, (offset, size) in enumerate(zip(shard_offsets, shard_sizes)):
            y[:, offset : offset + size] += _expand_shard(shrunk, b[slot], shard, offset, size, max_rank).to(y.dtype)


def _expand_shard(shrunk: torch.Tensor, b_slot: torch.Tensor, shard: int, offset: int, size: int,
                  max_rank: int) -> torch.Tensor:
    """One shard's output columns: its rank block of the shrunk input times its rows of B."""
    return shrunk[:, shard * max_rank : (shard + 1) * max_rank] @ b_slot[offset : offset + size].t()
