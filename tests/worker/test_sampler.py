"""The sampler on hand-made logits: each parameter exactly or statistically, seeded reproducibility, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm.params import SamplingParams
from pagedllm.worker.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    SamplingRow,
    apply_logits_processing,
    compute_logprobs,
    generator_seed,
    generator_seeds,
)

CPU = torch.device("cpu")


def make_row(params: SamplingParams | None = None, prompt=(), output=(), seed: int = 0) -> SamplingRow:
    return SamplingRow(params or SamplingParams(), list(prompt), list(output), seed)


def run(logits: torch.Tensor, rows: list[SamplingRow], eos: tuple[int, ...] = ()) -> SamplerOutput:
    metadata = SamplingMetadata.build(rows, logits.shape[1], CPU, eos)
    return Sampler()(logits, metadata)


def draws(logits_row: list[float] | torch.Tensor, params: SamplingParams, num: int, first_seed: int = 0):
    """``num`` independent samples from one distribution: one row per sample, each with its own seed."""
    logits = torch.as_tensor(logits_row, dtype=torch.float32).expand(num, -1).contiguous()
    rows = [make_row(params, seed=first_seed + i) for i in range(num)]
    return run(logits, rows).sampled_token_ids


def frequencies(samples: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(samples, minlength=vocab_size).double() / samples.numel()


def chi_square(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's statistic over the tokens with non-zero expected probability (the others must not appear)."""
    counts = torch.bincount(samples, minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * samples.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of zero probability"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# 99.9% quantiles of chi-square with df degrees of freedom (the seeds are fixed, so the tests are deterministic).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def entropy(probs: torch.Tensor) -> float:
    p = probs[probs > 0]
    return float(-(p * p.log()).sum())


# -- distributions ------------------------------------------------------------------------------------------------


def test_plain_sampling_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    samples = draws(logits, SamplingParams(), 20000)
    assert chi_square(samples, logits.softmax(-1)) < CHI2_999[5]


def test_temperature_matches_scaled_softmax() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0])
    samples = draws(logits, SamplingParams(temperature=0.5), 20000)
    assert chi_square(samples, (logits / 0.5).softmax(-1)) < CHI2_999[3]


def test_temperature_near_zero_is_greedy_and_high_temperature_flattens() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    assert (draws(logits, SamplingParams(temperature=0.01), 2000) == 3).all()
    entropies = [entropy(frequencies(draws(logits, SamplingParams(temperature=t), 8000), 5)) for t in (0.3, 1.0, 2.0)]
    assert entropies[0] < entropies[1] < entropies[2]
    assert entropies[2] == pytest.approx(entropy((logits / 2.0).softmax(-1)), abs=0.02)
    assert entropies[2] < math.log(5)


def test_greedy_takes_argmax_of_each_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    out = run(logits, [make_row(SamplingParams(temperature=0.0), seed=i) for i in range(6)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64 and out.logprobs is None


def test_mixed_batch_greedy_and_random_rows() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 30)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(8)]
    out = run(logits, [make_row(p, seed=i) for i, p in enumerate(params)]).sampled_token_ids
    assert torch.equal(out[1::2], logits[1::2].argmax(-1))


def test_top_k_1_equals_greedy() -> None:
    torch.manual_seed(2)
    logits = torch.randn(200, 40) * 3
    rows = [make_row(SamplingParams(top_k=1, temperature=1.5), seed=i) for i in range(200)]
    assert torch.equal(run(logits, rows).sampled_token_ids, logits.argmax(-1))


def test_top_k_samples_among_the_k_most_likely_in_proportion() -> None:
    logits = torch.tensor([0.5, 2.0, -1.0, 1.5, 1.0, 0.0])
    samples = draws(logits, SamplingParams(top_k=3), 12000)
    kept = torch.tensor([False, True, False, True, True, False])
    expected = logits.masked_fill(~kept, -math.inf).softmax(-1)
    assert chi_square(samples, expected) < CHI2_999[2]


def test_top_k_only_rows_without_top_k_keep_the_whole_vocabulary() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, 2.7]] * 2000)
    params = [SamplingParams(top_k=2) if i % 2 == 0 else SamplingParams() for i in range(2000)]
    out = run(logits, [make_row(p, seed=i) for i, p in enumerate(params)]).sampled_token_ids
    assert set(out[0::2].tolist()) == {0, 1}
    assert set(out[1::2].tolist()) == {0, 1, 2, 3}


def test_top_k_alone_does_not_sort_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sort(*args, **kwargs):
        raise AssertionError("sorted the whole vocabulary")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    logits = torch.randn(4, 100)
    run(logits, [make_row(SamplingParams(top_k=k), seed=k) for k in (1, 5, 0, 50)])
    run(logits, [make_row(SamplingParams(min_p=0.1, temperature=0.7), seed=k) for k in range(4)])


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    # 0.7: {0.5, 0.3} (0.5 alone is short of 0.7); 0.81: adds 0.15; 0.4: the top token alone.
    for top_p, kept in ((0.7, [1, 3]), (0.81, [1, 2, 3]), (0.4, [1])):
        samples = draws(logits, SamplingParams(top_p=top_p), 6000)
        mask = torch.zeros(4, dtype=torch.bool)
        mask[kept] = True
        expected = probs.masked_fill(~mask, 0.0)
        expected /= expected.sum()
        df = len(kept) - 1
        if df == 0:
            assert (samples == kept[0]).all()
        else:
            assert chi_square(samples, expected) < CHI2_999[df]


def test_top_p_applies_to_the_distribution_left_by_top_k() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top_k=3 renormalizes to [4/9, 3/9, 2/9]; top_p=0.7 then needs the first two (4/9 < 0.7 <= 7/9).
    samples = draws(probs.log(), SamplingParams(top_k=3, top_p=0.7), 6000)
    assert chi_square(samples, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0])) < CHI2_999[1]


def test_min_p_cuts_tokens_below_min_p_times_p_max() -> None:
    probs = torch.tensor([0.1, 0.4, 0.3, 0.2])
    samples = draws(probs.log(), SamplingParams(min_p=0.6), 6000)  # threshold 0.24
    assert chi_square(samples, torch.tensor([0.0, 4 / 7, 3 / 7, 0.0])) < CHI2_999[1]
    assert (draws(probs.log(), SamplingParams(min_p=1.0), 500) == 1).all()


def test_min_p_is_relative_to_the_tempered_distribution() -> None:
    probs = torch.tensor([0.1, 0.4, 0.3, 0.2])
    # At temperature 0.5 the probabilities are proportional to p^2: 0.09/0.16 > 0.5 > 0.04/0.16.
    samples = draws(probs.log(), SamplingParams(min_p=0.5, temperature=0.5), 6000)
    assert chi_square(samples, torch.tensor([0.0, 16 / 25, 9 / 25, 0.0])) < CHI2_999[1]


# -- logit bias, bans, penalties --------------------------------------------------------------------------------


def test_large_negative_logit_bias_bans_and_large_positive_forces() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, -2.0])
    assert (draws(logits, SamplingParams(logit_bias={1: -100}), 2000) != 1).all()
    assert (draws(logits, SamplingParams(logit_bias={3: 100}), 2000) == 3).all()
    greedy = SamplingParams(temperature=0.0, logit_bias={"1": -100.0})
    assert run(logits[None], [make_row(greedy)]).sampled_token_ids.item() == 2


def test_logit_bias_adds_exactly() -> None:
    logits = torch.zeros(2, 5)
    rows = [make_row(SamplingParams(logit_bias={0: 1.5, 4: -2.0})), make_row()]
    metadata = SamplingMetadata.build(rows, 5, CPU, ())
    out = apply_logits_processing(logits.clone(), metadata)
    assert out.tolist() == [[1.5, 0.0, 0.0, 0.0, -2.0], [0.0] * 5]


def penalized(params: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5], [2.0, -1.0, 0.5, 3.0, -0.5]])
    rows = [make_row(params, prompt, output), make_row(SamplingParams(), prompt, output)]
    out = apply_logits_processing(logits.clone(), SamplingMetadata.build(rows, 5, CPU, ()))
    assert out[1].tolist() == logits[1].tolist()  # the row without penalties is untouched
    return out[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_on_prompt_and_output() -> None:
    got = penalized(SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1, 1, 2])
    assert got == pytest.approx([1.0, -2.0, 0.25, 3.0, -0.5])


def test_frequency_penalty_scales_with_output_count_only() -> None:
    got = penalized(SamplingParams(frequency_penalty=0.5), prompt=[0, 3], output=[1, 1, 2])
    assert got == pytest.approx([2.0, -2.0, 0.0, 3.0, -0.5])


def test_presence_penalty_once_per_output_token() -> None:
    got = penalized(SamplingParams(presence_penalty=0.3), prompt=[0, 3], output=[1, 1, 2])
    assert got == pytest.approx([2.0, -1.3, 0.2, 3.0, -0.5])


def test_penalties_combine_repetition_first() -> None:
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3)
    got = penalized(params, prompt=[0], output=[1, 1, 2])
    assert got == pytest.approx([1.0, -2.0 - 1.0 - 0.3, 0.25 - 0.5 - 0.3, 3.0, -0.5])


def test_negative_penalties_encourage_repetition() -> None:
    got = penalized(SamplingParams(frequency_penalty=-1.0, repetition_penalty=0.5), prompt=[], output=[4])
    assert got == pytest.approx([2.0, -1.0, 0.5, 3.0, -0.25 + 1.0])


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.5]])
    params = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert run(logits, [make_row(params, output=[1])]).sampled_token_ids.item() == 2


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0]] * 3)
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4], logit_bias={3: 50.0})
    rows = [make_row(params, output=[1] * n) for n in (0, 2, 3)]
    assert run(logits, rows, eos=(3,)).sampled_token_ids.tolist() == [2, 2, 3]


def test_min_tokens_ban_holds_for_random_rows() -> None:
    logits = torch.tensor([0.0, 0.5, 4.0])
    samples = draws(logits, SamplingParams(min_tokens=2), 0)  # empty batch is fine
    assert samples.numel() == 0
    rows = [make_row(SamplingParams(min_tokens=2), output=[0], seed=i) for i in range(1000)]
    out = run(logits.expand(1000, -1).contiguous(), rows, eos=(2,)).sampled_token_ids
    assert (out != 2).all()


# -- randomness ---------------------------------------------------------------------------------------------------


def flat_logits(vocab_size: int = 64) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, vocab_size)


def test_seeded_row_is_independent_of_the_rest_of_the_batch_and_its_position() -> None:
    logits = flat_logits()
    params = SamplingParams(top_p=0.9, temperature=0.8)
    alone = [
        run(logits[None], [make_row(params, output=[5] * 3, seed=s)]).sampled_token_ids.item() for s in range(20)
    ]
    torch.manual_seed(3)
    others = [
        make_row(SamplingParams(temperature=0.0)),
        make_row(SamplingParams(top_k=3, min_p=0.1), seed=999),
        make_row(SamplingParams(frequency_penalty=1.0), output=[1, 2], seed=7),
    ]
    for position in (0, 1, 3):
        in_batch = []
        for s in range(20):
            rows = others[:position] + [make_row(params, output=[5] * 3, seed=s)] + others[position:]
            batch_logits = torch.randn(4, 64)
            batch_logits[position] = logits
            in_batch.append(run(batch_logits, rows).sampled_token_ids[position].item())
        assert in_batch == alone


def test_same_seed_and_position_repeats_after_recompute() -> None:
    logits = flat_logits()[None]
    first = [run(logits, [make_row(output=[1] * n, seed=11)]).sampled_token_ids.item() for n in range(30)]
    again = [run(logits, [make_row(output=[2] * n, seed=11)]).sampled_token_ids.item() for n in range(30)]
    assert first == again  # the draw depends on the number of outputs, not on their values
    assert len(set(first)) > 10  # and the positions differ from one another


def test_different_seeds_differ() -> None:
    samples = draws(flat_logits(), SamplingParams(), 200).tolist()
    assert len(set(samples)) > 30
    assert draws(flat_logits(), SamplingParams(), 50, first_seed=1000).tolist() != samples[:50]


def test_generator_seed_mixes_both_inputs() -> None:
    seeds = {generator_seed(s, n) for s in range(50) for n in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= s < 2**63 for s in seeds)
    assert generator_seed(-5, 3) == generator_seed(-5, 3)


def test_generator_seeds_match_generator_seed_row_by_row() -> None:
    sampling_seeds = [0, 1, -5, 2**63 - 1, -(2**63), 12345678901234]
    positions = [0, 7, 3, 1000, 2, 2**20]
    expected = [generator_seed(s, n) for s, n in zip(sampling_seeds, positions)]
    assert generator_seeds(sampling_seeds, positions).tolist() == expected
    huge = [2**64 + 3, 2**70 - 1]  # outside int64: reduced modulo 2**64, as generator_seed does
    assert generator_seeds(huge, [4, 5]).tolist() == [generator_seed(2**64 + 3, 4), generator_seed(2**70 - 1, 5)]


def test_metadata_of_plain_rows_packs_temperature_and_seeds() -> None:
    rows = [make_row(SamplingParams(temperature=0.0 if i == 2 else 0.6), output=[1] * i, seed=i) for i in range(4)]
    md = SamplingMetadata.build(rows, 10, CPU, ())
    assert md.temperature.dtype == torch.float32 and md.temperature.tolist() == pytest.approx([0.6, 0.6, 1.0, 0.6])
    assert md.greedy_mask.tolist() == [False, False, True, False]
    assert md.seeds.dtype == torch.int64 and md.seeds.tolist() == [generator_seed(i, i) for i in range(4)]
    assert md.random_seeds == [(i, generator_seed(i, i)) for i in (0, 1, 3)]
    assert md.needs_only_temperature and md.no_top_k and md.no_top_p and md.no_min_p and md.no_penalties


# -- logprobs -----------------------------------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits_with_ranks() -> None:
    torch.manual_seed(4)
    logits = torch.randn(4, 20)
    params = [
        SamplingParams(logprobs=3, temperature=0.5, presence_penalty=1.0),
        SamplingParams(),  # asked nothing: still a row, sliced away by the caller
        SamplingParams(logprobs=0, temperature=0.0, logit_bias={0: 100}),
        SamplingParams(logprobs=5, top_k=2),
    ]
    out = run(logits, [make_row(p, output=[1, 2], seed=i) for i, p in enumerate(params)])
    expected = torch.log_softmax(logits, -1)
    lp = out.logprobs
    assert lp is not None and lp.token_ids.shape == (4, 6) and lp.logprobs.dtype == torch.float32
    assert torch.equal(lp.token_ids[:, 0], out.sampled_token_ids)
    assert out.sampled_token_ids[2].item() == 0
    assert torch.allclose(lp.logprobs[:, 0], expected.gather(1, out.sampled_token_ids[:, None])[:, 0], atol=1e-6)
    ranks = (expected > lp.logprobs[:, :1]).sum(-1) + 1
    assert torch.equal(lp.ranks[:, 0], ranks)
    top = expected.topk(5, dim=-1)
    assert torch.equal(lp.token_ids[:, 1:], top.indices)
    assert torch.allclose(lp.logprobs[:, 1:], top.values, atol=1e-6)
    assert lp.ranks[:, 1:].tolist() == [[1, 2, 3, 4, 5]] * 4


def test_to_top_logprobs_slices_a_row() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    out = run(logits, [make_row(SamplingParams(temperature=0.0, logprobs=2, logit_bias={0: 10}))])
    top = out.logprobs.cpu().to_top_logprobs(0, 1)
    assert top.token_ids == [0, 1]
    assert top.ranks == [4, 1]  # the raw-logit rank of the chosen token: the bias does not count
    assert top.logprobs == pytest.approx(torch.log_softmax(logits[0], -1)[[0, 1]].tolist())
    assert len(out.logprobs.to_top_logprobs(0, -1).token_ids) == 3


def test_logprobs_minus_one_is_the_whole_vocabulary() -> None:
    logits = torch.randn(2, 7)
    out = run(logits, [make_row(SamplingParams(logprobs=-1)), make_row(SamplingParams(logprobs=1), seed=1)])
    assert out.logprobs.token_ids.shape == (2, 8)
    assert sorted(out.logprobs.token_ids[0, 1:].tolist()) == list(range(7))


def test_compute_logprobs_for_prompt_positions() -> None:
    logits = torch.randn(5, 11, dtype=torch.bfloat16)
    targets = torch.tensor([3, 0, 10, 3, 7])
    lp = compute_logprobs(logits, targets, 2)
    expected = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(lp.logprobs[:, 0], expected[torch.arange(5), targets], atol=1e-6)
    assert torch.equal(lp.ranks[:, 0], (expected > expected[torch.arange(5), targets][:, None]).sum(-1) + 1)
    assert lp.token_ids.shape == (5, 3)


def test_input_logits_are_not_modified_and_half_precision_works() -> None:
    logits = torch.randn(3, 16)
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_p=0.5, repetition_penalty=1.5, logit_bias={2: 3.0})
    run(logits, [make_row(params, prompt=[1, 2], output=[3], seed=i) for i in range(3)])
    assert torch.equal(logits, before)
    out = run(logits.to(torch.bfloat16), [make_row(params, seed=i) for i in range(3)])
    assert out.sampled_token_ids.shape == (3,)


def test_metadata_skips_unused_features() -> None:
    rows = [make_row(SamplingParams(temperature=0.0)), make_row(SamplingParams(temperature=0.0), seed=1)]
    md = SamplingMetadata.build(rows, 10, CPU, (9,))
    assert md.all_greedy and md.no_penalties and md.no_top_k and md.no_top_p and md.no_min_p
    assert md.temperature is None and md.logit_bias is None and md.banned is None and md.random_seeds == []
    assert md.max_num_logprobs is None and not md.modifies_logits
    md = SamplingMetadata.build([make_row(SamplingParams(top_k=3, logprobs=2))], 10, CPU, ())
    assert md.all_random and md.max_top_k == 3 and md.no_top_p and md.temperature is None
    assert md.max_num_logprobs == 2 and md.greedy_mask is None


@pytest.mark.parametrize("num_rows", [1, 2, 3, 5])
def test_every_packed_row_array_is_16_byte_aligned_whatever_the_batch_size(num_rows: int) -> None:
    # Triton specializes its kernels on each pointer's 16-byte alignment: with arrays packed at 8-byte offsets the
    # sampling kernels compiled anew, inside a step, whenever the batch size changed parity.
    rows = [SamplingRow(SamplingParams(temperature=0.5, seed=i, presence_penalty=0.1), [0, 1], [2], i)
            for i in range(num_rows)]
    metadata = SamplingMetadata.build(rows, 32, "cpu", ())
    arrays = [metadata.temperature, metadata.seeds]
    assert all(a is not None for a in arrays)
    assert [a.data_ptr() % 16 for a in arrays] == [0] * len(arrays)
