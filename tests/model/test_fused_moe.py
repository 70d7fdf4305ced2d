"""MoE routing, the block alignment and the fused Triton grouped GEMMs against the torch reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors in float32 (tests/conftest.py set
TRITON_INTERPRET=1); with CUDA they run compiled in bfloat16 and float32, and once inside a captured CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.moe.align import align_to_blocks, padded_capacity
from pagedllm.model.moe.router import select_experts
from pagedllm.model.moe.torch_moe import torch_moe

fused = pytest.importorskip("pagedllm.model.moe.fused_moe")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32]
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 2e-5}


def random_experts(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=generator) / intermediate**0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def random_routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 0):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    return select_experts(logits.to(DEVICE), top_k, renormalize=True)


def test_select_experts_matches_both_hf_routings() -> None:
    logits = torch.randn(5, 8)
    weights, ids = select_experts(logits, 2, renormalize=True)
    # Mixtral's statement of it: a softmax over the top-k logits.
    top_logits, top_ids = logits.topk(2, dim=-1)
    torch.testing.assert_close(weights, top_logits.softmax(-1))
    assert torch.equal(ids, top_ids)
    unnormalized, _ = select_experts(logits, 2, renormalize=False)
    torch.testing.assert_close(unnormalized, logits.softmax(-1).topk(2, dim=-1).values)
    assert select_experts(logits, 2, True, torch.bfloat16)[0].dtype == torch.bfloat16


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "block_m"),
                         [(1, 8, 2, 16), (5, 4, 2, 4), (40, 8, 3, 16), (3, 64, 8, 16)])
def test_align_groups_every_pair_once_in_expert_blocks(num_tokens, num_experts, top_k, block_m) -> None:
    _, ids = random_routing(num_tokens, num_experts, top_k)
    blocks = align_to_blocks(ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    sorted_ids = blocks.sorted_ids.cpu()
    used = int(blocks.num_padded.item())
    assert sorted_ids.numel() == padded_capacity(num_pairs, num_experts, block_m) >= used
    assert used % block_m == 0
    real = sorted_ids[sorted_ids < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    assert (sorted_ids[used:] == num_pairs).all()  # nothing past the used rows
    flat_ids = ids.reshape(-1).cpu()
    for block in range(used // block_m):
        rows = sorted_ids[block * block_m:(block + 1) * block_m]
        rows = rows[rows < num_pairs]
        assert rows.numel() > 0 and (flat_ids[rows.long()] == blocks.expert_ids[block].cpu()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fuse_silu_mul", [True, False])
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "hidden", "intermediate"),
                         [(1, 4, 2, 64, 32), (7, 8, 2, 72, 40), (33, 4, 3, 64, 48), (20, 16, 4, 96, 24)])
def test_fused_moe_equals_torch_reference(dtype, fuse_silu_mul, num_tokens, num_experts, top_k, hidden,
                                          intermediate) -> None:
    w13, w2 = random_experts(num_experts, hidden, intermediate, dtype)
    weights, ids = random_routing(num_tokens, num_experts, top_k)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    expected = torch_moe(x, w13, w2, weights, ids)
    actual = fused.fused_moe(x, w13, w2, weights, ids, fuse_silu_mul=fuse_silu_mul)
    assert actual.shape == expected.shape and actual.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def test_fused_moe_with_forced_larger_row_blocks() -> None:
    """Row blocks of 32 and 64 (chosen for big steps) on a small case, so the interpreter covers them too."""
    w13, w2 = random_experts(4, 64, 32, torch.float32)
    weights, ids = random_routing(9, 4, 2)
    x = torch.randn(9, 64).to(DEVICE)
    expected = torch_moe(x, w13, w2, weights, ids)
    for block_m in (32, 64):
        tiles = fused.TileConfig(block_m, 32, 32, 32, num_warps=4, num_stages=2)
        torch.testing.assert_close(fused.fused_moe(x, w13, w2, weights, ids, tiles=tiles), expected,
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_fused_moe_replays_in_a_cuda_graph_with_new_routing() -> None:
    w13, w2 = random_experts(16, 128, 64, torch.bfloat16)
    x = torch.randn(4, 128, device=DEVICE, dtype=torch.bfloat16)
    logits = torch.randn(4, 16, device=DEVICE)
    fused.fused_moe(x, w13, w2, *select_experts(logits, 2, True))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused.fused_moe(x, w13, w2, *select_experts(logits, 2, True))
    for seed in range(3):
        logits.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE))
        x.copy_(torch.randn(4, 128, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        expected = torch_moe(x, w13, w2, *select_experts(logits, 2, True))
        torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
