"""The device's adapter slots: a fixed pool of ``max_loras`` slots in every LoRA layer, filled from a CPU cache.

Adapters are loaded from disk into an LRU cache of ``max_cpu_loras`` on the host (in the model's dtype, converted
once), and copied into a slot when a step needs them and they are not in one; the slot reused is the least recently
used one no request of the step needs (the scheduler never puts more distinct adapters in a step than there are
slots, so there always is one). Copies are ordered on the device's stream after the steps that read the slot before.

Each step, ``stage_step`` maps every token to its request's slot (-1 = the base model) on the host, and ``upload``
(given the step's token count, padded to a CUDA graph's size) writes the tokens sorted by slot and their tiles
(``punica.step_tiles``) into fixed buffers and copies them to the device without waiting (the runner's staged-input
discipline: host buffers are rewritten only after the previous step's copies ran); the Triton kernels and the CUDA
graphs read them there. Without the kernels: each token's slot on the device, and for the torch path the token
indices of each slot.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pagedllm.config import LoRAConfig, ModelConfig, lora_shrink_overlap_by_env
from pagedllm.lora.adapter import LoRAAdapter, load_adapter
from pagedllm.lora.layers import LoRALayerWeights, LoRAStepContext
from pagedllm.lora.request import LoRARequest
from pagedllm.lora.tiles import SMALL_STEP_TOKENS, max_tiles, max_tiles_of_any_step, step_tiles
from pagedllm.staged_buffer import StagedBuffer

logger = logging.getLogger(__name__)

# HF module -> (the fused layer it lives in, under a decoder layer; its shard there).
MODULE_PLACES = {
    "q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1), "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0), "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_LAYER_PATHS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class LoRASlotPool:
    """Adapter slots on the device, the CPU cache behind them, and the step's token -> slot mapping."""

    def __init__(self, model: nn.Module, model_config: ModelConfig, lora_config: LoRAConfig, max_num_tokens: int,
                 device: torch.device, dtype: torch.dtype, use_kernels: bool) -> None:
        self.model_config = model_config
        self.lora_config = lora_config
        self.device = device
        self.dtype = dtype
        is_cuda = device.type == "cuda"
        self._slots_host = torch.full((max_num_tokens,), -1, dtype=torch.int32, pin_memory=is_cuda)
        self._slots_np = self._slots_host.numpy()
        token_slots = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device) if is_cuda \
            else self._slots_host
        self.context = LoRAStepContext(token_slots, use_kernels)
        self.kernels_available = use_kernels
        self._sorted_tokens = StagedBuffer((max_num_tokens,), torch.int32, device)
        self._tiles = StagedBuffer((max_tiles_of_any_step(max_num_tokens, lora_config.max_loras), 3), torch.int32,
                                   device)
        self.context.tiles = (self._sorted_tokens.device, self._tiles.device)
        if use_kernels and is_cuda and lora_shrink_overlap_by_env():
            self.context.side_stream = torch.cuda.Stream(device)
        self.layers: dict[tuple[int, str], LoRALayerWeights] = {}
        self._attach(model)
        self._cpu_cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self._free_slots = list(range(lora_config.max_loras - 1, -1, -1))
        self.num_slot_loads = 0  # adapters copied into a slot (a swap when the slot held another)
        self._num_staged = 0  # tokens of the staged step (the rest of the buffer, up to a graph's size, is padding)

    def _attach(self, model: nn.Module) -> None:
        """Give each adapter-capable linear layer its slot buffers (``layer.lora``)."""
        decoder_layers = model.model.layers
        for index, decoder_layer in enumerate(decoder_layers):
            for path in _LAYER_PATHS:
                linear = decoder_layer.get_submodule(path)
                shard_sizes = _shard_sizes(linear)
                weights = LoRALayerWeights(self.lora_config.max_loras, self.lora_config.max_lora_rank,
                                           linear.input_size, shard_sizes, self.context, self.dtype, self.device)
                linear.lora = weights
                self.layers[(index, path)] = weights

    @property
    def num_bytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.layers.values())

    # ---- adapters into slots ---------------------------------------------------------------------------------

    def assign_slots(self, lora_requests: Sequence[LoRARequest]) -> dict[int, int]:
        """Put every adapter of the step in a slot (loading and evicting as needed): adapter id -> slot."""
        needed = {request.lora_int_id: request for request in lora_requests}
        if len(needed) > self.lora_config.max_loras:
            raise RuntimeError(f"A step needs {len(needed)} adapters but there are {self.lora_config.max_loras} slots "
                               "(the scheduler should never allow it)")
        for lora_id, request in needed.items():
            if lora_id in self._slot_of:
                self._slot_of.move_to_end(lora_id)
            else:
                self._load_into_slot(request, self._take_slot(needed))
        return {lora_id: self._slot_of[lora_id] for lora_id in needed}

    def _take_slot(self, needed: dict[int, LoRARequest]) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        victim = next(lora_id for lora_id in self._slot_of if lora_id not in needed)
        return self._slot_of.pop(victim)

    def _load_into_slot(self, request: LoRARequest, slot: int) -> None:
        adapter = self._cached_adapter(request)
        shards_of_layer: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = defaultdict(dict)
        for (layer, module), pair in adapter.weights.items():
            path, shard = MODULE_PLACES[module]
            shards_of_layer[(layer, path)][shard] = pair
        for key, weights in self.layers.items():
            shards = shards_of_layer.get(key, {})
            if adapter.rank < weights.max_rank or len(shards) < len(weights.shard_sizes):
                weights.clear_slot(slot)  # what the adapter does not overwrite must add nothing
            for shard, (lora_a, lora_b) in shards.items():
                weights.set_shard(slot, shard, lora_a, lora_b)
        self._slot_of[request.lora_int_id] = slot
        self.num_slot_loads += 1

    def _cached_adapter(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter from the CPU cache (LRU of max_cpu_loras), read from disk when it is not there."""
        adapter = self._cpu_cache.get(request.lora_int_id)
        if adapter is not None and adapter.name == request.lora_name:
            self._cpu_cache.move_to_end(request.lora_int_id)
            return adapter
        adapter = load_adapter(request.lora_path, request.lora_name, request.lora_int_id, self.model_config,
                               self.lora_config.max_lora_rank)
        # In the slots' dtype once, here: converting ~20 MB (Qwen3-0.6B, rank 16) at every slot load cost more than
        # the copy.
        adapter.weights = {key: (a.to(self.dtype), b.to(self.dtype)) for key, (a, b) in adapter.weights.items()}
        self._cpu_cache[request.lora_int_id] = adapter
        while len(self._cpu_cache) > self.lora_config.num_cpu_loras:
            self._cpu_cache.popitem(last=False)
        return adapter

    def holds(self, lora_id: int) -> bool:
        """Whether the adapter's weights are here (in a slot or in the CPU cache)."""
        return lora_id in self._slot_of or lora_id in self._cpu_cache

    def remove(self, lora_id: int) -> None:
        """Forget an adapter (unloaded by the server): its slot is free, its weights leave the CPU cache."""
        self._cpu_cache.pop(lora_id, None)
        slot = self._slot_of.pop(lora_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    # ---- the step's token -> slot mapping --------------------------------------------------------------------

    def stage_step(self, lora_requests: list[LoRARequest | None], query_lens: list[int]) -> None:
        """Map each token of the step (requests in batch order, ``query_lens`` tokens each) to its slot (on the
        host; ``upload`` copies what the layers read)."""
        present = [request for request in lora_requests if request is not None]
        context = self.context
        context.is_active = bool(present)
        context.use_kernels = self.kernels_available
        num_tokens = self._num_staged = sum(query_lens)
        if not present:
            self._slots_np[:num_tokens] = -1
            context.groups = []
            return
        slot_of = self.assign_slots(present)
        request_slots = np.array([-1 if r is None else slot_of[r.lora_int_id] for r in lora_requests], np.int32)
        token_slots = self._slots_np[:num_tokens]
        token_slots[:] = np.repeat(request_slots, query_lens)
        if not self.kernels_available:
            context.groups = [(slot, torch.from_numpy(np.flatnonzero(token_slots == slot)).to(self.device))
                              for slot in sorted(set(slot_of.values()))]

    def upload(self, num_padded: int) -> None:
        """Copy the step's mapping to the device for ``num_padded`` tokens (padding, up to a graph's size, maps to no
        adapter): the sorted tokens and tiles the kernels read, or each token's slot."""
        self._slots_np[self._num_staged:num_padded] = -1
        if self.kernels_available:
            perm, tiles = step_tiles(self._slots_np[:num_padded], self.lora_config.max_loras)
            self._sorted_tokens.np[: len(perm)] = perm
            self._tiles.np[: len(tiles)] = tiles
            self._sorted_tokens.upload(len(perm))
            self._tiles.upload(len(tiles))
        elif self.context.token_slots is not self._slots_host:
            self.context.token_slots[:num_padded].copy_(self._slots_host[:num_padded], non_blocking=True)

    def warm_up_kernels(self) -> None:
        """Compile the kernels of every layer shape, for small steps (tiles of 16 tokens) and large ones (64), now:
        a first compile in the middle of a run stalled that step for seconds. The tiles are empty: nothing is added."""
        if not self.kernels_available:
            return
        from pagedllm.lora import punica

        shapes = {}
        for weights in self.layers.values():
            shapes.setdefault((tuple(weights.a.shape), tuple(weights.shard_sizes)), weights)
        for num_tokens in (1, SMALL_STEP_TOKENS + 1):
            sorted_tokens = torch.zeros(num_tokens, dtype=torch.int32, device=self.device)
            tiles = torch.zeros(max_tiles(num_tokens, self.lora_config.max_loras), 3, dtype=torch.int32,
                                device=self.device)
            for weights in shapes.values():
                x = torch.zeros(num_tokens, weights.a.shape[2], dtype=self.dtype, device=self.device)
                y = torch.zeros(num_tokens, weights.b.shape[1], dtype=self.dtype, device=self.device)
                punica.add_lora(y, x, weights.a, weights.b, sorted_tokens, tiles, weights.shard_offsets_gpu,
                                weights.shard_sizes_gpu, weights.max_rank, weights.max_shard_size)

    def prepare_capture(self) -> None:
        """Before capturing CUDA graphs: every LoRA layer runs, reading only device data (the tile buffers, or the
        slot buffer)."""
        self.context.is_active = True
        self.context.groups = None
        self.context.use_kernels = self.kernels_available
        self._num_staged = 0


def _shard_sizes(linear: nn.Module) -> list[int]:
    """Output sizes of a layer's shards, in shard order (one shard for a plain layer)."""
    shards = getattr(linear, "shards", None)
    if shards is None:
        return [linear.output_size]
    return [shard.size for shard in sorted(shards.values(), key=lambda shard: shard.index)]
