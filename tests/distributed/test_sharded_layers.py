"""Sharded layers against their unsharded versions, and the weight-shard loader.

The loader tests build each rank's layer in this process under a fake rank state (no collective runs); the layer
tests spawn two gloo ranks, which compute the same outputs as the unsharded layers."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from pagedllm.distributed.parallel_state import GroupState, ParallelState, set_parallel_state
from pagedllm.model.layers import LMHead, VocabEmbedding
from pagedllm.model.linear import Linear, MergedLinear, QKVLinear, tp_attention_heads

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, VOCAB = 16, 4, 4, 2, 10


def _tp(rank: int, size: int) -> ParallelState:
    return ParallelState(tp=GroupState(rank, size, None))


def _load(layer, name: str, tensor: torch.Tensor, shard_id=None) -> None:
    param = dict(layer.named_parameters())[name]
    param.weight_loader(param, tensor, shard_id)


def test_qkv_shards_by_heads_and_replicates_kv_heads_beyond_their_number():
    q, k, v = (torch.randn(n * HEAD_DIM, HIDDEN) for n in (HEADS, KV_HEADS, KV_HEADS))
    for tp in (1, 2, 4):
        for rank in range(tp):
            with set_parallel_state(_tp(rank, tp)):
                layer = QKVLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False)
            for shard_id, tensor in zip("qkv", (q, k, v)):
                _load(layer, "weight", tensor, shard_id)
            heads, kv_heads, kv_index = tp_attention_heads(HEADS, KV_HEADS, GroupState(rank, tp))
            assert (layer.num_heads, layer.num_kv_heads) == (heads, kv_heads) == (HEADS // tp, max(1, KV_HEADS // tp))
            q_rows = q[rank * heads * HEAD_DIM : (rank + 1) * heads * HEAD_DIM]
            kv_rows = slice(kv_index * kv_heads * HEAD_DIM, (kv_index + 1) * kv_heads * HEAD_DIM)
            # Query head h reads KV head h // (HEADS // KV_HEADS): the rank holds the KV head its query heads read.
            assert kv_index == (rank * heads) // (HEADS // KV_HEADS)
            assert torch.equal(layer.weight, torch.cat([q_rows, k[kv_rows], v[kv_rows]]))


def test_fused_checkpoint_tensor_is_cut_into_shards_per_rank():
    """A checkpoint that stores qkv fused already (Phi-3) loads per rank like three separate tensors."""
    full = torch.randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
    q, k, v = full.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM])
    for rank in range(2):
        with set_parallel_state(_tp(rank, 2)):
            fused, separate = (QKVLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS) for _ in range(2))
        _load(fused, "weight", full)
        for shard_id, tensor in zip("qkv", (q, k, v)):
            _load(separate, "weight", tensor, shard_id)
        assert torch.equal(fused.weight, separate.weight)


def test_column_and_row_layers_load_their_slices():
    gate, up, down = torch.randn(12, HIDDEN), torch.randn(12, HIDDEN), torch.randn(HIDDEN, 12)
    bias = torch.randn(HIDDEN)
    for rank in range(2):
        with set_parallel_state(_tp(rank, 2)):
            merged = MergedLinear(HIDDEN, [12, 12])
            row = Linear(12, HIDDEN, bias=True, parallel="row")
        _load(merged, "weight", gate, 0)
        _load(merged, "weight", up, 1)
        _load(row, "weight", down)
        _load(row, "bias", bias)
        assert torch.equal(merged.weight, torch.cat([gate[rank * 6 : rank * 6 + 6], up[rank * 6 : rank * 6 + 6]]))
        assert torch.equal(row.weight, down[:, rank * 6 : rank * 6 + 6])
        assert torch.equal(row.bias, bias)  # whole on every rank, added once after the sum


def test_vocab_parallel_embedding_pads_the_last_rank():
    table = torch.randn(VOCAB, HIDDEN)
    parts = []
    for rank in range(4):  # 10 rows over 4 ranks: 3, 3, 3, 1 (+2 zero rows)
        with set_parallel_state(_tp(rank, 4)):
            embedding = VocabEmbedding(VOCAB, HIDDEN)
        _load(embedding, "weight", table)
        parts.append(embedding.weight)
    assert torch.equal(torch.cat(parts)[:VOCAB], table)
    assert not parts[-1][1:].any()


def test_int4_with_tensor_parallelism_is_refused():
    from pagedllm.model.quantization.gptq import GPTQConfig

    import pytest

    config = GPTQConfig(bits=4, group_size=32)
    with set_parallel_state(_tp(0, 2)), pytest.raises(ValueError, match="tensor_parallel_size"):
        Linear(64, 64, quant_config=config, parallel="row")


# ---- two gloo ranks ------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, init_method: str, results) -> None:
    from pagedllm.distributed.parallel_state import init_distributed

    init_distributed(rank, world, 1, init_method, "cpu")
    torch.manual_seed(0)
    x = torch.randn(5, HIDDEN)
    ids = torch.tensor([0, 3, 4, 9, 7])
    w_col, b_col = torch.randn(12, HIDDEN), torch.randn(12)
    w_row, b_row = torch.randn(HIDDEN, 12), torch.randn(HIDDEN)
    table = torch.randn(VOCAB, HIDDEN)
    column = MergedLinear(HIDDEN, [12], bias=True)
    row = Linear(12, HIDDEN, bias=True, parallel="row")
    embedding = VocabEmbedding(VOCAB, HIDDEN)
    head = LMHead(VOCAB, HIDDEN)
    for layer, name, tensor, shard in ((column, "weight", w_col, 0), (column, "bias", b_col, 0),
                                       (row, "weight", w_row, None), (row, "bias", b_row, None),
                                       (embedding, "weight", table, None), (head, "weight", table, None)):
        _load(layer, name, tensor, shard)
    hidden = torch.randn(5, 12)
    got = {
        # a column layer's outputs, gathered, are the unsharded layer's
        "column": column.tp.comm.all_gather(column(x), dim=-1),
        "row": row(hidden[:, rank * 6 : rank * 6 + 6]),  # a row layer takes its slice of the features
        "embedding": embedding(ids),
        "lm_head": head(x),
    }
    expected = {
        "column": x @ w_col.T + b_col,
        "row": hidden @ w_row.T + b_row,
        "embedding": table[ids],
        "lm_head": (x @ table.T).float(),
    }
    results[rank] = {name: bool(torch.allclose(got[name], expected[name], atol=1e-5)) for name in got}


def test_sharded_layers_equal_unsharded_over_two_gloo_ranks():
    from pagedllm.distributed.parallel_state import distributed_init_method

    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank_main, args=(2, distributed_init_method(), results), nprocs=2, join=True,
                           start_method="spawn")
        assert dict(results) == {rank: dict.fromkeys(["column", "row", "embedding", "lm_head"], True)
                                 for rank in range(2)}
