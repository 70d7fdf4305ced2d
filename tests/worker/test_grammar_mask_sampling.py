"""Rows under a grammar keep the batch on the fused Triton path: the result equals the general path's (a float32
copy of the whole batch, masked, then tempered and drawn). On CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.params import SamplingParams  # noqa: E402
from pagedllm.worker.sampler import (  # noqa: E402
    GrammarMask,
    Sampler,
    SamplingMetadata,
    SamplingRow,
    apply_logits_processing,
)
from tests.worker.test_triton_sampling import DEVICE, MODULE_NAME, load_interpreted_copy  # noqa: E402

VOCAB_SIZE = 100


@pytest.fixture
def triton_sampler(monkeypatch: pytest.MonkeyPatch) -> Sampler:
    kernels = sys.modules.get(MODULE_NAME) if DEVICE.type == "cuda" else load_interpreted_copy()
    if kernels is None:
        import pagedllm.worker.triton_sampling as kernels
    monkeypatch.setitem(sys.modules, MODULE_NAME, kernels)
    return Sampler(use_triton=True)


def grammar_mask(rows: list[int], generator: torch.Generator) -> GrammarMask:
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), 4), dtype=torch.int32, generator=generator)
    return GrammarMask(torch.tensor(rows, device=DEVICE), bitmask.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_with_grammar_rows_equals_general_path(triton_sampler: Sampler, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, VOCAB_SIZE, generator=generator) * 3).to(DEVICE, dtype)
    params = [SamplingParams(temperature=0.0 if i == 4 else 0.5 + 0.2 * i) for i in range(6)]
    rows = [SamplingRow(p, [1], [2] * i, sampling_seed=10 + i) for i, p in enumerate(params)]
    metadata = SamplingMetadata.build(rows, VOCAB_SIZE, DEVICE, eos_token_ids=())
    metadata.grammar_mask = grammar_mask([1, 4, 5], generator)
    assert metadata.needs_only_temperature

    sampled = triton_sampler(logits, metadata).sampled_token_ids
    processed = apply_logits_processing(logits.float(), metadata)
    expected, _ = triton_sampler._sample(processed, metadata, use_triton=True)
    assert sampled.tolist() == expected.tolist()
    assert torch.isfinite(processed[torch.arange(6, device=DEVICE), sampled]).all()  # only allowed tokens


@pytest.mark.parametrize("temperatures, races", [((0.0, 0.7, 0.7), [True]), ((0.0,), []), ((1.0, 1.0), [False])])
def test_warm_up_runs_every_kernel_of_a_step_and_leaves_the_logits(
    triton_sampler: Sampler, monkeypatch: pytest.MonkeyPatch, temperatures: tuple[float, ...], races: list[bool]
) -> None:
    """``Sampler.warm_up`` draws, masks with a grammar and ranks candidates (each kernel a grammar step adds), the
    race scores with a temperature to divide by where a row has one; an all-greedy batch (no seeds) ranks its
    logits as they are. The caller's logits stay as they were."""
    import pagedllm.worker.sampler as sampler_module

    masked, scored = [], []
    apply_grammar_mask = sampler_module.apply_grammar_mask
    monkeypatch.setattr(sampler_module, "apply_grammar_mask",
                        lambda logits, mask: masked.append(mask.bitmask.shape) or apply_grammar_mask(logits, mask))
    race_scores = sys.modules[MODULE_NAME].race_scores
    monkeypatch.setattr(sys.modules[MODULE_NAME], "race_scores",
                        lambda *args: scored.append(args[3] is not None) or race_scores(*args))
    num_rows = len(temperatures)
    logits = torch.randn(num_rows, VOCAB_SIZE, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before = logits.clone()
    params = [SamplingParams(temperature=t) for t in temperatures]
    metadata = SamplingMetadata.build([SamplingRow(p, [1], [], 5) for p in params], VOCAB_SIZE, DEVICE, ())
    triton_sampler.warm_up(logits, metadata)
    assert masked[0] == (num_rows, -(-VOCAB_SIZE // 32)) and scored == races
    assert torch.equal(logits, before)
