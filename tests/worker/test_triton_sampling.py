"""The fused Triton sampling kernel: on CUDA where there is a GPU, else in Triton's interpreter on CPU.

The interpreter runs each program in Python (~8 ms per row here), so the CPU runs use few rows; the statistical
test draws more where a GPU runs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("triton")

import pagedllm.worker  # noqa: E402
from pagedllm.params import SamplingParams  # noqa: E402
from pagedllm.worker.sampler import Sampler, SamplingMetadata, SamplingRow, generator_seed  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODULE_NAME = "pagedllm.worker.triton_sampling"


def load_interpreted_copy() -> ModuleType:
    """A private copy of the kernel module whose kernel was decorated under TRITON_INTERPRET=1.

    ``triton.jit`` reads the variable when it decorates, so it is set only while the copy loads, and the copy
    lives under its own name: neither the variable nor an interpreted kernel leaks into other test modules.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        path = Path(pagedllm.worker.__file__).parent / "triton_sampling.py"
        spec = importlib.util.spec_from_file_location("_interpreted_triton_sampling", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    return importlib.import_module(MODULE_NAME) if DEVICE.type == "cuda" else load_interpreted_copy()


@pytest.fixture
def triton_sampler(kernels: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Sampler:
    """A Sampler that draws with the kernel (on CPU: the interpreted copy, in place of the real module)."""
    monkeypatch.setitem(sys.modules, MODULE_NAME, kernels)
    return Sampler(use_triton=True)


def seeds_of(*pairs: tuple[int, int]) -> torch.Tensor:
    """Generator seeds of (sampling_seed, num_output_tokens) pairs, as the metadata gives them to the kernel."""
    return torch.tensor([generator_seed(seed, position) for seed, position in pairs], device=DEVICE)


def chi_square(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's statistic over the tokens of non-zero probability (the others must not appear at all)."""
    counts = torch.bincount(samples.cpu(), minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * samples.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of zero probability"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# -- the randomness rule ------------------------------------------------------------------------------------------


def test_same_seed_same_token_and_seeds_differ(kernels: ModuleType) -> None:
    logits = torch.zeros(16, 50, device=DEVICE)  # uniform: the token is decided by the noise alone
    seeds = seeds_of(*[(seed, 0) for seed in range(16)])
    first = kernels.sample_rows(logits, seeds)
    assert torch.equal(first, kernels.sample_rows(logits, seeds))
    assert len(set(first.tolist())) > 8
    assert not torch.equal(first, kernels.sample_rows(logits, seeds_of(*[(seed, 1) for seed in range(16)])))


def test_row_is_independent_of_batch_composition_and_position(kernels: ModuleType) -> None:
    torch.manual_seed(0)
    row_logits = torch.randn(300, device=DEVICE)
    pair = (42, 7)
    alone = [kernels.sample_rows(row_logits[None] * scale, seeds_of(pair)).item() for scale in (1.0, 0.2)]
    for position in (0, 2, 4):
        batch = torch.randn(5, 300, device=DEVICE) * 3
        others = [(seed, seed) for seed in range(100 + position, 104 + position)]
        pairs = others[:position] + [pair] + others[position:]
        greedy = torch.tensor([i % 2 == 1 and i != position for i in range(5)], device=DEVICE)
        for scale, expected in zip((1.0, 0.2), alone):
            batch[position] = row_logits * scale
            sampled = kernels.sample_rows(batch, seeds_of(*pairs), greedy)
            assert sampled[position].item() == expected


def test_block_size_changes_nothing(kernels: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise of a column depends on (seed, column) alone: small blocks (a running max over 5 of them, the
    last one partial) draw the same tokens as one block."""
    torch.manual_seed(1)
    logits = torch.randn(6, 300, device=DEVICE)
    seeds = seeds_of(*[(seed, 3) for seed in range(6)])
    greedy = torch.tensor([False, True, False, False, True, False], device=DEVICE)
    one_block = kernels.sample_rows(logits, seeds, greedy)
    monkeypatch.setattr(kernels, "BLOCK_SIZE", 64)
    assert torch.equal(kernels.sample_rows(logits, seeds, greedy), one_block)


def test_split_vocabulary_path_draws_what_one_program_per_row_draws(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small batches split each row over one program per block and merge the blocks' winners: the same tokens as
    the one-program loop, ties across blocks (the earliest wins) and rows of only -inf included."""
    torch.manual_seed(3)
    monkeypatch.setattr(kernels, "BLOCK_SIZE", 64)  # 5 blocks of a 300-token row, the last one partial
    logits = torch.randn(6, 300, device=DEVICE)
    logits[1, [30, 100, 290]] = 50.0  # a greedy tie across three blocks
    logits[2] = -math.inf
    logits[3, 200:] = -math.inf
    seeds = seeds_of(*[(seed, 5) for seed in range(6)])
    greedy = torch.tensor([False, True, True, False, False, True], device=DEVICE)
    temperature = torch.tensor([0.5, 1.0, 1.0, 2.0, 0.7, 1.0], device=DEVICE)
    split = kernels.sample_rows(logits, seeds, greedy, temperature)
    monkeypatch.setattr(kernels, "MAX_ROWS_FOR_SPLIT_VOCAB", 0)
    assert torch.equal(split, kernels.sample_rows(logits, seeds, greedy, temperature))
    assert split[1].item() == 30 and split[2].item() == 0 and split[3].item() < 200


# -- greedy rows, bans, the distribution --------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_first_index_on_ties(kernels: ModuleType) -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 200, device=DEVICE)
    logits[3, [17, 150]] = 10.0  # a tie across positions: the first index wins, as torch.argmax
    greedy = torch.tensor([True, False, True, True], device=DEVICE)
    sampled = kernels.sample_rows(logits.to(torch.bfloat16), seeds_of(*[(s, 0) for s in range(4)]), greedy)
    expected = logits.to(torch.bfloat16).float().argmax(-1)
    assert sampled[[0, 2, 3]].tolist() == expected[[0, 2, 3]].tolist()
    assert sampled[3].item() == 17


def test_banned_tokens_are_never_sampled(kernels: ModuleType) -> None:
    logits = torch.full((6, 40), -math.inf, device=DEVICE)
    logits[:3, 25] = -80.0  # the only allowed token, however unlikely
    logits[3:5, 5:8] = torch.tensor([0.0, 30.0, -30.0], device=DEVICE)
    greedy = torch.tensor([False, True, False, False, False, False], device=DEVICE)
    sampled = kernels.sample_rows(logits, seeds_of(*[(s, 9) for s in range(6)]), greedy)
    assert sampled[:3].tolist() == [25, 25, 25]
    assert set(sampled[3:5].tolist()) <= {5, 6, 7}
    assert sampled[5].item() == 0  # a row of only -inf gives token 0, as torch.argmax does on the CPU path


def test_sampling_matches_the_tempered_softmax(kernels: ModuleType) -> None:
    num_draws = 20000 if DEVICE.type == "cuda" else 400
    logits = torch.tensor([1.0, 0.2, -math.inf, -0.5, 2.0], device=DEVICE)
    temperature = torch.full((num_draws,), 0.7, device=DEVICE)
    seeds = seeds_of(*[(seed, 0) for seed in range(num_draws)])
    sampled = kernels.sample_rows(logits.expand(num_draws, -1).contiguous(), seeds, temperature=temperature)
    assert chi_square(sampled, (logits / 0.7).softmax(-1).cpu()) < 16.27  # 99.9% quantile, 3 degrees of freedom


# -- through the Sampler ------------------------------------------------------------------------------------------


def run(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    metadata = SamplingMetadata.build(rows, logits.shape[1], DEVICE, eos_token_ids=())
    return sampler(logits, metadata).sampled_token_ids


def test_sampler_fused_path_greedy_rows_and_seeded_rows(triton_sampler: Sampler) -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 100, device=DEVICE)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.6) for i in range(4)]
    rows = [SamplingRow(p, [1], [2] * i, sampling_seed=i) for i, p in enumerate(params)]
    assert SamplingMetadata.build(rows, 100, DEVICE, ()).needs_only_temperature
    sampled = run(triton_sampler, logits, rows)
    assert sampled[1::2].tolist() == logits[1::2].argmax(-1).tolist()
    alone = run(triton_sampler, logits[2:3], rows[2:3])  # the same row, first in a batch of one
    assert alone.item() == sampled[2].item()


def test_sampler_filtered_path_applies_top_k_and_bias(triton_sampler: Sampler) -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, 2.7, 0.0]] * 8, device=DEVICE)
    params = [
        SamplingParams(top_k=2),
        SamplingParams(top_k=1, temperature=1.5),
        SamplingParams(temperature=0.0, logit_bias={4: 10.0}),
        SamplingParams(logit_bias={3: -100.0}, top_p=0.5),
    ] * 2
    rows = [SamplingRow(p, [], [], sampling_seed=i) for i, p in enumerate(params)]
    sampled = run(triton_sampler, logits, rows).tolist()
    assert sampled[0] in (0, 1) and sampled[4] in (0, 1)
    assert sampled[1] == sampled[5] == 0  # top_k=1 is greedy
    assert sampled[2] == sampled[6] == 4  # greedy after the bias
    assert sampled[3] in (0, 1) and sampled[7] in (0, 1)  # top_p=0.5 keeps the two most likely


def test_cpu_sampler_does_not_import_triton_by_default() -> None:
    logits = torch.randn(2, 10)
    rows = [SamplingRow(SamplingParams(temperature=0.8), [], [], sampling_seed=i) for i in range(2)]
    before = MODULE_NAME in sys.modules
    Sampler()(logits, SamplingMetadata.build(rows, 10, "cpu", ()))
    assert (MODULE_NAME in sys.modules) == before
