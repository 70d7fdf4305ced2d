"""The Triton shrink / expand kernels against the torch reference (``layers.add_lora_grouped``) on random slot layouts.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET) in float32; with CUDA
compiled, in float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

punica = pytest.importorskip("pagedllm.lora.punica")

from pagedllm.lora.layers import LoRALayerWeights, LoRAStepContext, add_lora_grouped, add_lora_masked

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "input_size", "shard_sizes", "max_rank", "num_slots"), [
    (1, 64, [64], 8, 1),
    (7, 96, [64, 32, 32], 16, 3),  # qkv with GQA
    (13, 200, [72, 72], 8, 4),  # gate/up, sizes not multiples of the tile
    (33, 48, [40], 32, 2),
])
def test_kernels_match_reference(dtype: torch.dtype, num_tokens: int, input_size: int, shard_sizes: list[int],
                                 max_rank: int, num_slots: int) -> None:
    torch.manual_seed(num_tokens)
    layer = random_layer(num_slots, max_rank, input_size, shard_sizes, dtype, num_tokens)
    slots = torch.randint(-1, num_slots, (num_tokens,), dtype=torch.int32, device=DEVICE)
    layer.context.token_slots[:num_tokens] = slots
    x = torch.randn(num_tokens, input_size, device=DEVICE).to(dtype)
    base = torch.randn(num_tokens, sum(shard_sizes), device=DEVICE).to(dtype)
    expected = base.float().clone()
    add_lora_grouped(expected, x.float(), layer.a.float(), layer.b.float(), groups_of(slots), layer.shard_offsets,
                     layer.shard_sizes, max_rank)
    actual = base.clone()
    punica.add_lora(actual, x, layer.a, layer.b, layer.context.token_slots, layer.shard_offsets_gpu,
                    layer.shard_sizes_gpu, max_rank, max(shard_sizes))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected, atol=tol, rtol=tol)
    base_rows = slots < 0
    assert torch.equal(actual[base_rows], base[base_rows])  # the base model's tokens are untouched


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
def test_kernels_replay_in_cuda_graph_with_new_slots() -> None:
    torch.manual_seed(1)
    layer = random_layer(4, 16, 256, [128, 64, 64], torch.bfloat16, 8)
    token_slots = layer.context.token_slots
    x = torch.randn(8, 256, device=DEVICE, dtype=torch.bfloat16)
    y = torch.zeros(8, 256, device=DEVICE, dtype=torch.bfloat16)

    def run() -> None:
        y.zero_()
        punica.add_lora(y, x, layer.a, layer.b, token_slots, layer.shard_offsets_gpu, layer.shard_sizes_gpu, 16, 128)

    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for trial in range(3):
        slots = torch.randint(-1, 4, (8,), dtype=torch.int32, device=DEVICE)
        token_slots[:8] = slots
        graph.replay()
        expected = torch.zeros(8, 256, device=DEVICE)
        add_lora_grouped(expected, x.float(), layer.a.float(), layer.b.float(), groups_of(slots), layer.shard_offsets,
                         layer.shard_sizes, 16)
        torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "input_size", "shard_sizes", "max_rank", "num_slots"), [
    (70, 96, [64, 32, 32], 16, 3),  # segments longer than a tile, and ragged ones
    (9, 80, [72, 72], 32, 4),
])
def test_segmented_kernels_match_reference(dtype: torch.dtype, num_tokens: int, input_size: int,
                                           shard_sizes: list[int], max_rank: int, num_slots: int) -> None:
    torch.manual_seed(num_tokens + 1)
    layer = random_layer(num_slots, max_rank, input_size, shard_sizes, dtype, num_tokens)
    slots = torch.randint(-1, num_slots, (num_tokens,), dtype=torch.int32)
    perm, tiles = punica.segment_tiles(slots.numpy())
    assert sorted(perm.tolist()) == torch.nonzero(slots >= 0).flatten().tolist()
    x = torch.randn(num_tokens, input_size, device=DEVICE).to(dtype)
    base = torch.randn(num_tokens, sum(shard_sizes), device=DEVICE).to(dtype)
    expected = base.float().clone()
    slots = slots.to(DEVICE)
    add_lora_grouped(expected, x.float(), layer.a.float(), layer.b.float(), groups_of(slots), layer.shard_offsets,
                     layer.shard_sizes, max_rank)
    actual = base.clone()
    punica.add_lora_segmented(actual, x, layer.a, layer.b, torch.from_numpy(perm).to(DEVICE),
                              torch.from_numpy(tiles).to(DEVICE), layer.shard_offsets_gpu, layer.shard_sizes_gpu,
                              max_rank, max(shard_sizes))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected, atol=tol, rtol=tol)
    assert torch.equal(actual[slots < 0], base[slots < 0])


def test_segment_tiles_cut_each_slot_into_tiles() -> None:
    import numpy as np

    slots = np.array([1, -1, 0, 1, 1, 0, -1, 2] + [0] * 40, dtype=np.int32)
    perm, tiles = punica.segment_tiles(slots, block_m=32)
    assert [slots[p] for p in perm] == sorted(int(s) for s in slots if s >= 0)
    assert tiles.T.tolist() == [[0, 0, 32], [0, 32, 42], [1, 42, 45], [2, 45, 46]]


def test_slot_pool_warm_up_compiles_the_tiled_kernels_and_adds_nothing(tmp_path) -> None:
    from pagedllm.config import LoRAConfig
    from pagedllm.lora.slots import LoRASlotPool
    from pagedllm.model.loader import get_model
    from tests.utils import build_tiny_model

    model_dir = build_tiny_model(tmp_path, "llama")
    from pagedllm.config import ModelConfig

    model_config = ModelConfig.from_pretrained(model_dir, None)
    model = get_model(model_config, "dummy", "cpu", "torch")
    pool = LoRASlotPool(model, model_config, LoRAConfig(2, 16), 64, torch.device("cpu"), torch.float32, True)
    pool.warm_up_kernels()  # interpreted on CPU: it must run over every layer shape without error
    assert all(w.a.abs().sum() == 0 for w in pool.layers.values())


@pytest.mark.parametrize(("num_tokens", "input_size"), [(1, 1024), (3, 700)])
def test_split_k_shrink_of_small_batches(num_tokens: int, input_size: int) -> None:
    """A small batch splits K (partial sums added by the expand): the same delta as the reference."""
    torch.manual_seed(5)
    layer = random_layer(2, 16, input_size, [48, 16, 16], torch.float32, num_tokens)
    slots = torch.tensor([1, 0, -1][:num_tokens], dtype=torch.int32, device=DEVICE)
    layer.context.token_slots[:num_tokens] = slots
    x = torch.randn(num_tokens, input_size, device=DEVICE)
    assert punica.shrink(x, layer.a, layer.context.token_slots).shape[0] > 1  # split
    expected, actual = torch.zeros(num_tokens, 80, device=DEVICE), torch.zeros(num_tokens, 80, device=DEVICE)
    add_lora_grouped(expected, x, layer.a, layer.b, groups_of(slots), layer.shard_offsets, layer.shard_sizes, 16)
    punica.add_lora(actual, x, layer.a, layer.b, layer.context.token_slots, layer.shard_offsets_gpu,
                    layer.shard_sizes_gpu, 16, 48)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
