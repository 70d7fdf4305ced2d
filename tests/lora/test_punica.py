"""The Triton shrink / expand kernels (over tiles of tokens sorted by slot) against the torch reference
(``layers.add_lora_grouped``) on random slot layouts, and the host-side tiling (``tiles.step_tiles``).

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET) in float32; with CUDA
compiled, in float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

punica = pytest.importorskip("pagedllm.lora.punica")

import numpy as np

from pagedllm.lora.layers import LoRALayerWeights, LoRAStepContext, add_lora_grouped, add_lora_masked
from pagedllm.lora.tiles import SMALL_STEP_TOKENS, max_tiles, step_tiles
from pagedllm.model.split_k import sm_count

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def random_layer(num_slots: int, max_rank: int, input_size: int, shard_sizes: list[int], dtype: torch.dtype,
                 num_tokens: int) -> LoRALayerWeights:
    context = LoRAStepContext(torch.full((num_tokens + 5,), -1, dtype=torch.int32, device=DEVICE), False, True)
    layer = LoRALayerWeights(num_slots, max_rank, input_size, shard_sizes, context, dtype, torch.device(DEVICE))
    for slot in range(num_slots):
        rank = max(1, max_rank >> (slot % 3))  # ranks below the padded one leave zeros
        for shard, size in enumerate(shard_sizes):
            layer.set_shard(slot, shard, torch.randn(rank, input_size, device=DEVICE).to(dtype) / input_size**0.5,
                            torch.randn(size, rank, device=DEVICE).to(dtype) / rank**0.5)
    return layer


def groups_of(slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    return [(int(s), torch.nonzero(slots == s).flatten()) for s in slots.unique().tolist() if s >= 0]


def add_with_kernels(layer: LoRALayerWeights, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> None:
    """The kernels' delta into y for this slot of each token, through the tiles the slot pool would upload."""
    perm, tiles = step_tiles(slots.cpu().numpy(), layer.a.shape[0])
    punica.add_lora(y, x, layer.a, layer.b, torch.from_numpy(perm).to(DEVICE), torch.from_numpy(tiles).to(DEVICE),
                    layer.shard_offsets_gpu, layer.shard_sizes_gpu, layer.max_rank, layer.max_shard_size)


def reference(layer: LoRALayerWeights, base: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    expected = base.float().clone()
    add_lora_grouped(expected, x.float(), layer.a.float(), layer.b.float(), groups_of(slots), layer.shard_offsets,
                     layer.shard_sizes, layer.max_rank)
    return expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "input_size", "shard_sizes", "max_rank", "num_slots"), [
    (1, 64, [64], 8, 1),  # a rank below tl.dot's 16, padded
    (7, 96, [64, 32, 32], 16, 3),  # qkv with GQA
    (13, 200, [72, 72], 8, 4),  # gate/up, sizes not multiples of the tile
    (33, 48, [40], 32, 2),  # a slot's run longer than a tile of 16
    (SMALL_STEP_TOKENS + 20, 96, [64, 32, 32], 16, 3),  # a large step: tiles of 64
    (9, 80, [200], 128, 2),  # ranks in more than one block of the expand
])
def test_kernels_match_reference(dtype: torch.dtype, num_tokens: int, input_size: int, shard_sizes: list[int],
                                 max_rank: int, num_slots: int) -> None:
    torch.manual_seed(num_tokens)
    layer = random_layer(num_slots, max_rank, input_size, shard_sizes, dtype, num_tokens)
    slots = torch.randint(-1, num_slots, (num_tokens,), dtype=torch.int32, device=DEVICE)
    x = torch.randn(num_tokens, input_size, device=DEVICE).to(dtype)
    base = torch.randn(num_tokens, sum(shard_sizes), device=DEVICE).to(dtype)
    actual = base.clone()
    add_with_kernels(layer, actual, x, slots)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), reference(layer, base, x, slots), atol=tol, rtol=tol)
    base_rows = slots < 0
    assert torch.equal(actual[base_rows], base[base_rows])  # the base model's tokens are untouched


@pytest.mark.parametrize(("num_tokens", "input_size"), [(1, 1024), (3, 700)])
def test_split_k_shrink_of_small_steps(num_tokens: int, input_size: int) -> None:
    """A small step splits K (the slices summed by the last to arrive): the same delta as the reference, and the
    counters are left at zero for the next launch."""
    torch.manual_seed(5)
    layer = random_layer(2, 16, input_size, [48, 16, 16], torch.float32, num_tokens)
    slots = torch.tensor([1, 0, -1][:num_tokens], dtype=torch.int32, device=DEVICE)
    x = torch.randn(num_tokens, input_size, device=DEVICE)
    assert punica._shrink_split(num_tokens, 2, 1, input_size, sm_count(x.device))[1] > 1  # split
    actual = torch.zeros(num_tokens, 80, device=DEVICE)
    expected = reference(layer, torch.zeros_like(actual), x, slots)
    add_with_kernels(layer, actual, x, slots)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert not punica._shrink_arrivals(x.device).any()
    add_with_kernels(layer, actual, x, slots)  # a second launch counts from zero again: twice the delta
    torch.testing.assert_close(actual, 2 * expected, atol=2e-4, rtol=2e-4)


def test_step_tiles_sort_tokens_by_slot_and_pad_with_empty_tiles() -> None:
    slots = np.array([1, -1, 0, 1, 1, 0, -1, 2] + [0] * 20, dtype=np.int32)
    perm, tiles = step_tiles(slots, num_slots=4)
    assert [slots[p] for p in perm] == sorted(int(s) for s in slots if s >= 0)
    assert perm[:2].tolist() == [2, 5]  # stable: a slot's tokens in batch order
    assert tiles.shape == (max_tiles(len(slots), 4), 3) == (2 + 4, 3)
    assert tiles.tolist() == [[0, 0, 16], [0, 16, 22], [1, 22, 25], [2, 25, 26], [0, 0, 0], [0, 0, 0]]


def test_step_tiles_of_a_large_step_and_of_a_step_without_adapters() -> None:
    slots = np.array([3] * 130 + [-1] * 200, dtype=np.int32)
    perm, tiles = step_tiles(slots, num_slots=4)
    assert perm.tolist() == list(range(130))
    assert tiles[:4].tolist() == [[3, 0, 64], [3, 64, 128], [3, 128, 130], [0, 0, 0]]  # tiles of 64 above 256 tokens
    perm, tiles = step_tiles(np.full(5, -1, dtype=np.int32), num_slots=4)
    assert len(perm) == 0 and not tiles.any()


def test_masked_path_matches_grouped() -> None:
    torch.manual_seed(0)
    layer = random_layer(3, 8, 32, [16, 8, 8], torch.float32, 9)
    slots = torch.tensor([2, -1, 0, 0, 1, -1, 2, 2, 0], dtype=torch.int32, device=DEVICE)
    x = torch.randn(9, 32, device=DEVICE)
    grouped, masked = torch.zeros(9, 32, device=DEVICE), torch.zeros(9, 32, device=DEVICE)
    add_lora_grouped(grouped, x, layer.a, layer.b, groups_of(slots), layer.shard_offsets, layer.shard_sizes, 8)
    add_lora_masked(masked, x, layer.a, layer.b, slots, layer.shard_offsets, layer.shard_sizes, 8)
    torch.testing.assert_close(masked, grouped, atol=1e-5, rtol=1e-5)
    assert grouped[1].abs().sum() == 0 and grouped[0].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_kernels_replay_in_cuda_graph_with_new_tiles() -> None:
    torch.manual_seed(1)
    layer = random_layer(4, 16, 256, [128, 64, 64], torch.bfloat16, 8)
    x = torch.randn(8, 256, device=DEVICE, dtype=torch.bfloat16)
    y = torch.zeros(8, 256, device=DEVICE, dtype=torch.bfloat16)
    sorted_tokens = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    tiles = torch.zeros(max_tiles(8, 4), 3, dtype=torch.int32, device=DEVICE)

    def run() -> None:
        y.zero_()
        punica.add_lora(y, x, layer.a, layer.b, sorted_tokens, tiles, layer.shard_offsets_gpu, layer.shard_sizes_gpu,
                        16, 128)

    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        slots = torch.randint(-1, 4, (8,), dtype=torch.int32, device=DEVICE)
        perm, step = step_tiles(slots.cpu().numpy(), 4)
        sorted_tokens[: len(perm)] = torch.from_numpy(perm).to(DEVICE)
        tiles.copy_(torch.from_numpy(step))
        graph.replay()
        expected = reference(layer, torch.zeros(8, 256, device=DEVICE), x, slots)
        torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=3e-2)


def test_slot_pool_warm_up_compiles_the_kernels_and_adds_nothing(tmp_path) -> None:
    from pagedllm.config import LoRAConfig, ModelConfig
    from pagedllm.lora.slots import LoRASlotPool
    from pagedllm.model.loader import get_model
    from tests.utils import build_tiny_model

    model_dir = build_tiny_model(tmp_path, "llama")
    model_config = ModelConfig.from_pretrained(model_dir, None)
    model = get_model(model_config, "dummy", DEVICE, "torch")
    pool = LoRASlotPool(model, model_config, LoRAConfig(2, 16), 512, torch.device(DEVICE), torch.float32, True)
    pool.warm_up_kernels()  # compiled on CUDA, interpreted on CPU: it must run over every layer shape
    assert all(w.a.abs().sum() == 0 for w in pool.layers.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_shrink_beside_the_base_gemm_in_a_captured_graph() -> None:
    """``LoRALayerWeights.apply`` captured with a side stream (the shrink a branch beside the base product): each
    replay gives the base product plus the reference delta for that replay's tiles."""
    torch.manual_seed(2)
    layer = random_layer(4, 16, 256, [128, 64, 64], torch.bfloat16, 16)
    num_tokens = 16
    layer.context.use_kernels = layer.context.is_active = True
    layer.context.side_stream = torch.cuda.Stream()
    sorted_tokens = torch.zeros(num_tokens, dtype=torch.int32, device=DEVICE)
    tiles = torch.zeros(max_tiles(num_tokens, 4), 3, dtype=torch.int32, device=DEVICE)
    layer.context.tiles = (sorted_tokens, tiles)
    x = torch.randn(num_tokens, 256, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(256, 256, device=DEVICE, dtype=torch.bfloat16) / 16
    layer.apply(x, lambda: x @ weight.t())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer.apply(x, lambda: x @ weight.t())
    for _ in range(3):
        slots = torch.randint(-1, 4, (num_tokens,), dtype=torch.int32, device=DEVICE)
        perm, step = step_tiles(slots.cpu().numpy(), 4)
        sorted_tokens[: len(perm)] = torch.from_numpy(perm).to(DEVICE)
        tiles.copy_(torch.from_numpy(step))
        graph.replay()
        torch.testing.assert_close(y.float(), reference(layer, x @ weight.t(), x, slots), atol=5e-2, rtol=5e-2)
