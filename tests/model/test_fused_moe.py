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


# ---- the decode path: per-pair GEMVs with the routing inside (decode_moe.py) ----------------------------------------

decode = pytest.importorskip("pagedllm.model.moe.decode_moe")

# Logits in half precision where the weights are rounded to them (Qwen3-MoE); the interpreter has no bfloat16.
ROUNDED_LOGITS_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def decode_case(num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int, dtype: torch.dtype,
                logits_dtype: torch.dtype = torch.float32, seed: int = 0):
    """Experts, input and router logits of one decode-sized step."""
    w13, w2 = random_experts(num_experts, hidden, intermediate, dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_tokens, hidden, generator=generator).to(DEVICE, dtype)
    return x, w13, w2, distinct_logits(num_tokens, num_experts, logits_dtype, generator)


def distinct_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, generator: torch.Generator):
    """Router logits without ties in ``dtype`` (a shuffled grid in [0, 3), coarser than bfloat16's spacing there):
    on a tie torch.topk and the kernel may both be right and still pick differently."""
    order = torch.stack([torch.randperm(num_experts, generator=generator) for _ in range(num_tokens)])
    return (order * (3.0 / num_experts)).to(DEVICE, dtype)


def reference_moe(x, w13, w2, logits, top_k: int, renormalize: bool, round_weights: bool):
    weights, ids = select_experts(logits, top_k, renormalize, logits.dtype if round_weights else None)
    return torch_moe(x, w13, w2, weights, ids), weights, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "hidden", "intermediate", "renormalize", "rounded"),
                         [(1, 8, 2, 64, 32, True, False), (1, 64, 8, 128, 48, True, True),
                          (3, 16, 4, 72, 40, False, False), (2, 8, 1, 64, 24, True, False),
                          (4, 16, 8, 96, 32, False, True),
                          (8, 16, 8, 32, 16, True, False)])  # 64 pairs: past the model's limit, for the benchmarks
def test_decode_moe_equals_torch_reference(dtype, num_tokens, num_experts, top_k, hidden, intermediate, renormalize,
                                           rounded) -> None:
    logits_dtype = ROUNDED_LOGITS_DTYPE if rounded else torch.float32
    x, w13, w2, logits = decode_case(num_tokens, num_experts, top_k, hidden, intermediate, dtype, logits_dtype)
    expected, weights, ids = reference_moe(x, w13, w2, logits, top_k, renormalize, rounded)
    result = decode.fused_moe_decode_with_routing(x, w13, w2, logits, top_k, renormalize, rounded)
    assert torch.equal(result.topk_ids.long(), ids)
    torch.testing.assert_close(result.topk_weights, weights.float(), atol=1e-6, rtol=1e-6)
    assert result.output.shape == expected.shape and result.output.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(result.output.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("config", [decode.DecodeConfig(8, 16, 32, num_stages=2),
                                    decode.DecodeConfig(32, 64, 64, num_warps=8, num_stages=3)])
def test_decode_moe_with_forced_launch_shapes(config) -> None:
    """The narrowest and widest column blocks, and a K step shorter than K (several loop steps), on a small case."""
    x, w13, w2, logits = decode_case(2, 8, 4, 128, 80, torch.float32)
    expected, _, _ = reference_moe(x, w13, w2, logits, 4, True, False)
    actual = decode.fused_moe_decode(x, w13, w2, logits, 4, True, False, config=config)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)


def test_decode_path_takes_only_decode_sized_steps() -> None:
    top8_tokens = decode.MAX_PAIRS // 8
    assert decode.accepts(1, 8, 2048) and decode.accepts(top8_tokens, 8, 2048) and decode.accepts(16, 2, 4096)
    assert not decode.accepts(top8_tokens + 1, 8, 2048) and not decode.accepts(0, 8, 2048)
    assert not decode.accepts(32, 1, 4096)  # more (token, column block) counters than the skinny GEMM keeps
    x, w13, w2, logits = decode_case(5, 2, 2, 16384, 16, torch.float32)
    with pytest.raises(ValueError, match="5120 arrival counters"):  # one per token and 16-column block
        decode.fused_moe_decode(x, w13, w2, logits, 2, True, False, decode.DecodeConfig(8, 16))


def test_fused_moe_layer_picks_the_decode_path_for_few_tokens(monkeypatch) -> None:
    """``FusedMoE`` on the fused path (forced on, as on CUDA): decode-sized steps through ``decode_moe``, larger
    ones through the grouped GEMM; both equal the torch path."""
    from pagedllm.model.moe import layer

    moe = layer.FusedMoE(8, 2, 64, 32, renormalize=True, round_weights_to_dtype=False).to(DEVICE)
    w13, w2 = random_experts(8, 64, 32, torch.float32)
    moe.w13_weight.data.copy_(w13)
    moe.w2_weight.data.copy_(w2)
    calls = []
    monkeypatch.setattr(decode, "fused_moe_decode", _recording(decode.fused_moe_decode, calls))
    too_many = decode.MAX_PAIRS // 2 + 1  # top-2
    for num_tokens in (3, too_many):
        x, _, _, logits = decode_case(num_tokens, 8, 2, 64, 32, torch.float32)
        monkeypatch.setattr(layer, "uses_fused_moe", lambda _: False)
        expected = moe(x, logits)
        monkeypatch.setattr(layer, "uses_fused_moe", lambda _: True)
        torch.testing.assert_close(moe(x, logits), expected, atol=2e-5, rtol=2e-5)
    assert calls == [3]  # 3 tokens x top-2 is decode-sized, one pair past MAX_PAIRS is not


def _recording(fn, calls: list):
    def wrapper(x, *args, **kwargs):
        calls.append(x.shape[0])
        return fn(x, *args, **kwargs)
    return wrapper


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_decode_moe_replays_in_a_cuda_graph_with_new_routing() -> None:
    x, w13, w2, logits = decode_case(2, 64, 8, 256, 128, torch.bfloat16, torch.bfloat16)
    decode.fused_moe_decode(x, w13, w2, logits, 8, True, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode.fused_moe_decode(x, w13, w2, logits, 8, True, True)
    for seed in range(3):
        logits.copy_(distinct_logits(2, 64, torch.bfloat16, torch.Generator().manual_seed(seed)))
        x.copy_(torch.randn(2, 256, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        expected, _, _ = reference_moe(x, w13, w2, logits, 8, True, True)
        torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
