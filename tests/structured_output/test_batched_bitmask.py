"""The step's grammar work done in batch equals the per-row path: xgrammar's batched bitmask fill against one
matcher at a time, the staging buffers of the model runner, and the kernel mask against the torch unpacking."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from pagedllm.bench.structured import BENCH_SCHEMA
from pagedllm.params import StructuredOutputsParams
from pagedllm.structured_output.backend import StructuredOutputBackend, bitmask_width
from pagedllm.structured_output.manager import StructuredOutputManager
from pagedllm.worker.grammar_masks import MaskStaging
from pagedllm.worker.sampler import GrammarMask, apply_grammar_mask, apply_grammar_mask_torch

VOCAB_SIZE = 320  # the tiny model's (its tokenizer has 300 tokens)
STOP_TOKEN = 2  # the tiny tokenizer's eos


@pytest.fixture(scope="module")
def manager(so_model_dir: str) -> StructuredOutputManager:
    tokenizer = AutoTokenizer.from_pretrained(so_model_dir)
    assert tokenizer.eos_token_id == STOP_TOKEN
    manager = StructuredOutputManager(tokenizer, VOCAB_SIZE, [STOP_TOKEN])
    yield manager
    manager.shutdown()


def allowed_tokens(bitmask_row: torch.Tensor) -> list[int]:
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bitmask_row.unsqueeze(-1) >> shifts) & 1).bool().flatten()[:VOCAB_SIZE].nonzero().flatten().tolist()


def advanced_grammars(manager: StructuredOutputManager, num_grammars: int, seed: int) -> list:
    """Grammars of the bench schema, each advanced by a random walk over allowed tokens, short of the stop token (a
    finished grammar's request ends: it is never filled again)."""
    params = StructuredOutputsParams(json=BENCH_SCHEMA)
    grammars = manager.new_requests(params, num_grammars)
    rng, row = random.Random(seed), torch.zeros((1, bitmask_width(VOCAB_SIZE)), dtype=torch.int32)
    for grammar in grammars:
        for _ in range(rng.randrange(0, 300)):
            grammar.fill_bitmask(row, 0)
            choices = [token for token in allowed_tokens(row[0]) if token != STOP_TOKEN]
            if not choices:
                break
            grammar.accept_token(rng.choice(choices))
    return grammars


def per_row_bitmask(grammars: list) -> torch.Tensor:
    bitmask = torch.full((len(grammars), bitmask_width(VOCAB_SIZE)), -1, dtype=torch.int32)
    for row, grammar in enumerate(grammars):
        grammar.fill_bitmask(bitmask, row)
    return bitmask


def test_batched_fill_equals_per_row_fill(manager: StructuredOutputManager) -> None:
    grammars = advanced_grammars(manager, 24, seed=0)
    expected = per_row_bitmask(grammars)
    assert len({tuple(row) for row in expected.tolist()}) > len(grammars) // 2  # the walks reached varied states
    rows = random.Random(1).sample(range(40), len(grammars))  # scattered rows of a larger buffer
    batched = torch.zeros((40, expected.shape[1]), dtype=torch.int32)
    manager.backend.fill_bitmasks([g.matcher for g in grammars], batched, rows)
    assert torch.equal(batched[rows], expected)
    looped = torch.zeros_like(batched)  # the interface's default, for backends without a batch API
    StructuredOutputBackend.fill_bitmasks(manager.backend, [g.matcher for g in grammars], looped, rows)
    assert torch.equal(looped, batched)


def test_staging_fills_and_uploads_every_step(manager: StructuredOutputManager) -> None:
    staging = MaskStaging(max_rows=12, vocab_size=VOCAB_SIZE, device=torch.device("cpu"))
    for seed, num_grammars in ((2, 9), (3, 4)):
        grammars = advanced_grammars(manager, num_grammars, seed)
        staging.fill(grammars)
        assert torch.equal(staging.upload(num_grammars), per_row_bitmask(grammars))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_size", [100, 320, 1000])
def test_kernel_mask_equals_torch_mask(dtype: torch.dtype, vocab_size: int) -> None:
    generator = torch.Generator().manual_seed(vocab_size)
    for num_rows in (1, 7):
        logits = torch.randn(num_rows, vocab_size, generator=generator).to(dtype)
        rows = torch.randperm(num_rows, generator=generator)[: max(1, num_rows // 2)]
        words = bitmask_width(vocab_size)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), dtype=torch.int32, generator=generator)
        bitmask[0] = 0  # a row with nothing allowed
        mask = GrammarMask(rows, bitmask)
        assert torch.equal(apply_grammar_mask(logits.clone(), mask), apply_grammar_mask_torch(logits.clone(), mask))
