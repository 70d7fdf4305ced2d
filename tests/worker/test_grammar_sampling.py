"""Rows checked after their draw get exactly the token masking would give them (``worker/grammar_sampling.py``).

The sampler returns a checked row's best-scoring tokens in order; the first its grammar allows must be the masked
draw, on every sampling path: the fused Triton kernel (temperature only), the general Triton path (penalties,
bias), the CPU path (per-row generators) and all-greedy batches. Then ``GrammarSampling`` with a fake grammar
backend: candidates offered in order, a row no candidate fits drawn again with its mask, and the way of each
row's next step.
"""

from __future__ import annotations

import concurrent.futures
import math
import sys

import pytest
import torch

from pagedllm.params import SamplingParams
from pagedllm.structured_output.backend import GrammarMatcher, StructuredOutputBackend
from pagedllm.structured_output.manager import StructuredOutputRequest
from pagedllm.worker.grammar_masks import MaskStaging
from pagedllm.worker.grammar_sampling import GrammarSampling, can_check_after_draw
from pagedllm.worker.sampler import NUM_DRAW_CANDIDATES, GrammarMask, Sampler, SamplingMetadata, SamplingRow

VOCAB_SIZE = 100
NUM_ROWS = 8


@pytest.fixture(params=["cpu", "triton"])
def sampler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[Sampler, torch.device]:
    """A sampler and the device of its tensors: the CPU path, or the Triton kernels (on CUDA when there is one,
    else in Triton's interpreter)."""
    if request.param == "cpu":
        return Sampler(use_triton=False), torch.device("cpu")
    pytest.importorskip("triton")
    from tests.worker.test_triton_sampling import DEVICE, MODULE_NAME, load_interpreted_copy

    kernels = sys.modules.get(MODULE_NAME) if DEVICE.type == "cuda" else load_interpreted_copy()
    if kernels is None:
        import pagedllm.worker.triton_sampling as kernels
    monkeypatch.setitem(sys.modules, MODULE_NAME, kernels)
    return Sampler(use_triton=True), DEVICE


def allowed_sets(generator: torch.Generator, num_rows: int, share: float) -> list[set[int]]:
    return [set(torch.nonzero(torch.rand(VOCAB_SIZE, generator=generator) < share).flatten().tolist())
            for _ in range(num_rows)]


def bitmask_of(allowed: list[set[int]]) -> torch.Tensor:
    bits = torch.zeros((len(allowed), 4 * 32), dtype=torch.int64)
    for row, tokens in enumerate(allowed):
        bits[row, list(tokens)] = 1
    words = (bits.view(len(allowed), 4, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# Each case: the rows' params (every row checked), extra row state (outputs for penalties).
CASES = {
    "temperature_only": [SamplingParams(temperature=0.3 + 0.2 * i) for i in range(NUM_ROWS)],
    "greedy_and_random": [SamplingParams(temperature=0.0 if i % 3 == 0 else 0.9) for i in range(NUM_ROWS)],
    "all_greedy": [SamplingParams(temperature=0.0) for _ in range(NUM_ROWS)],
    "penalties_and_bias": [
        SamplingParams(temperature=0.8, presence_penalty=1.5, repetition_penalty=1.3, logit_bias={7: 5.0, 9: -3.0})
        for _ in range(NUM_ROWS)
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("share", [0.5, 0.1])
def test_first_allowed_candidate_is_the_masked_draw(sampler: tuple, case: str, share: float) -> None:
    sampler, device = sampler
    generator = torch.Generator().manual_seed(sorted(CASES).index(case) * 10 + int(share * 10))
    logits = (torch.randn(NUM_ROWS, VOCAB_SIZE, generator=generator) * 3).to(device)
    rows = [SamplingRow(p, [1, 2, 3], [4, 7, 7][: i % 4], sampling_seed=100 + i) for i, p in enumerate(CASES[case])]
    checked = torch.tensor([0, 2, 3, 5, 6], device=device)
    allowed = allowed_sets(generator, len(checked), share)

    metadata = SamplingMetadata.build(rows, VOCAB_SIZE, device, eos_token_ids=())
    metadata.checked_rows = checked
    unmasked = sampler(logits, metadata)
    masked_metadata = SamplingMetadata.build(rows, VOCAB_SIZE, device, eos_token_ids=())
    masked_metadata.grammar_mask = GrammarMask(checked, bitmask_of(allowed).to(device))
    masked = sampler(logits, masked_metadata).sampled_token_ids.tolist()

    candidates = unmasked.candidates.tolist()
    assert unmasked.candidates.shape == (len(checked), NUM_DRAW_CANDIDATES)
    for i, row in enumerate(checked.tolist()):
        assert candidates[i][0] == unmasked.sampled_token_ids[row].item()  # the first candidate is the draw
        assert len(set(candidates[i])) == NUM_DRAW_CANDIDATES
        fitting = [token for token in candidates[i] if token in allowed[i]]
        if fitting:  # a share of 0.1 can leave none of 16 allowed: then the row is drawn again with its mask
            assert fitting[0] == masked[row], (case, row)


def test_banned_tokens_are_never_candidates(sampler: tuple) -> None:
    """-inf scores (min_tokens bans here) come back as -1: such a token cannot be drawn, even if a grammar allows it."""
    sampler, device = sampler
    logits = torch.full((1, VOCAB_SIZE), -1000.0)
    logits[0, :3] = 0.0
    row = SamplingRow(SamplingParams(temperature=1.0, min_tokens=5), [1], [], sampling_seed=0)
    metadata = SamplingMetadata.build([row], VOCAB_SIZE, device, eos_token_ids=(0, 1))
    metadata.checked_rows = torch.tensor([0], device=device)
    logits = logits.to(device)
    candidates = sampler(logits, metadata).candidates[0].tolist()
    assert candidates[0] == 2
    assert 0 not in candidates and 1 not in candidates
    assert candidates.count(-1) == 0  # -1000 is finite: the rest are ranked


def test_filters_that_see_the_distribution_are_masked_first() -> None:
    assert can_check_after_draw(SamplingParams(temperature=0.7, presence_penalty=1.0))
    assert can_check_after_draw(SamplingParams(temperature=0.0, top_k=5))  # greedy: top_k is reset to 0
    for params in (SamplingParams(top_k=5), SamplingParams(top_p=0.9), SamplingParams(min_p=0.1)):
        assert not can_check_after_draw(params)


class SetMatcher(GrammarMatcher):
    """Allows the tokens of ``allowed[position]``, one set per accepted token; the sequence ends after the last.
    Its masks count as slow to fill (so that its rows can be checked after the draw) unless told otherwise."""

    def __init__(self, allowed: list[set[int]]) -> None:
        self.allowed, self.position, self.rejected, self.offers = allowed, 0, False, 0
        self.slow_masks = True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = bitmask_of([self.allowed[self.position]])[0]

    def accept_token(self, token_id: int) -> bool:
        accepted = self.try_accept_token(token_id)
        self.rejected |= not accepted
        return accepted

    def try_accept_token(self, token_id: int) -> bool:
        self.offers += 1
        if token_id not in self.allowed[self.position]:
            return False
        self.position += 1
        return True

    def is_terminated(self) -> bool:
        return self.rejected or self.position == len(self.allowed)


class SetBackend(StructuredOutputBackend):
    """Its "compiled grammar" is the list of allowed sets."""

    stop_token_ids = frozenset()

    def parse(self, kind, spec):
        raise NotImplementedError

    def compile(self, grammar):
        raise NotImplementedError

    # Never compiled in worker processes: its grammars are given ready-made (FakeGrammar).
    def worker_setup(self):
        raise NotImplementedError

    def worker_payload(self):
        raise NotImplementedError

    def load_compiled(self, serialized, slow_masks):
        raise NotImplementedError

    def new_matcher(self, compiled: list[set[int]]) -> SetMatcher:
        return SetMatcher(compiled)


def FakeGrammar(allowed: list[set[int]]) -> StructuredOutputRequest:
    """A request's grammar over ``SetMatcher``."""
    compiled = concurrent.futures.Future()
    compiled.set_result(allowed)
    grammar = StructuredOutputRequest(SetBackend(), compiled, deadline=math.inf)
    grammar.matcher  # noqa: B018 (made now, as a request's is at its first fill, so that its slow_masks counts)
    return grammar


class FakeState:
    def __init__(self, params: SamplingParams, grammar: FakeGrammar | None) -> None:
        self.sampling_params, self.structured_output, self.draw_checked = params, grammar, False


def run_steps(sampler: tuple, states: list[FakeState], num_steps: int, check_draws: bool, seed: int = 0):
    """Sample ``num_steps`` steps of ``states`` with fixed logits per step: the tokens of every step."""
    sampler, device = sampler
    grammar_sampling = GrammarSampling(len(states), VOCAB_SIZE, device, check_draws=check_draws)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step_index in range(num_steps):
        logits = (torch.randn(len(states), VOCAB_SIZE, generator=generator) * 2).to(device)
        rows = [SamplingRow(s.sampling_params, [1], [0] * step_index, sampling_seed=7 + i) for i, s in enumerate(states)]
        metadata = SamplingMetadata.build(rows, VOCAB_SIZE, device, eos_token_ids=())
        step = grammar_sampling.prepare(states, metadata)
        output = sampler(logits, metadata)
        sampled = output.sampled_token_ids.tolist()
        sampled = grammar_sampling.finish(
            step, states, sampled, output, metadata, lambda m, logits=logits: sampler(logits, m)
        )
        history.append((sampled, list(step.masked), list(step.checked), list(step.redrawn)))
    return history


def grammar_states(num_steps: int) -> list[FakeState]:
    """Rows alternating between wide steps (most tokens allowed) and narrow ones (one token), and a row without a
    grammar; one grammar row with top_p, which must always be masked first."""
    generator = torch.Generator().manual_seed(3)
    shapes = [[0.9, 0.9, 0.01, 0.9, 0.5, 0.01, 0.9, 0.9][:num_steps], [0.01, 0.6, 0.9, 0.9, 0.9, 0.1, 0.9, 0.01]]
    states = []
    for shape in shapes * 2:
        allowed = [set(torch.randperm(VOCAB_SIZE, generator=generator)[: max(1, int(s * VOCAB_SIZE))].tolist())
                   for s in shape[:num_steps]]
        states.append(FakeState(SamplingParams(temperature=1.0), FakeGrammar(allowed)))
    states.append(FakeState(SamplingParams(temperature=0.5), None))
    states[1].sampling_params = SamplingParams(temperature=1.0, top_p=0.9)
    return states


def test_checked_rows_get_the_tokens_of_masked_rows(sampler: tuple) -> None:
    num_steps = 8
    checked_run = run_steps(sampler, grammar_states(num_steps), num_steps, check_draws=True)
    masked_run = run_steps(sampler, grammar_states(num_steps), num_steps, check_draws=False)
    assert [tokens for tokens, *_ in checked_run] == [tokens for tokens, *_ in masked_run]
    assert all(not checked for _, _, checked, _ in masked_run)
    # Rows were checked, some of them drawn again; the top_p row never checked.
    assert sum(len(checked) for _, _, checked, _ in checked_run) >= 8
    assert any(redrawn for *_, redrawn in checked_run)
    assert all(1 not in checked for _, _, checked, _ in checked_run)


def test_every_token_is_allowed_and_grammars_advance(sampler: tuple) -> None:
    num_steps = 8
    states = grammar_states(num_steps)
    history = run_steps(sampler, states, num_steps, check_draws=True)
    for row, state in enumerate(states[:-1]):
        matcher = state.structured_output.matcher
        assert not matcher.rejected and matcher.position == num_steps
        for position, (tokens, *_) in enumerate(history):
            assert tokens[row] in matcher.allowed[position]


def test_rows_of_grammars_with_fast_masks_are_always_masked_first(sampler: tuple) -> None:
    num_steps = 4
    states = grammar_states(num_steps)
    for state in states[:-1]:
        state.structured_output.matcher.slow_masks = False
    history = run_steps(sampler, states, num_steps, check_draws=True)
    assert all(not checked and masked == [0, 1, 2, 3] for _, masked, checked, _ in history)
    assert [tokens for tokens, *_ in history] == [
        tokens for tokens, *_ in run_steps(sampler, grammar_states(num_steps), num_steps, check_draws=False)]


def test_a_row_is_checked_after_a_wide_mask_and_masked_after_a_narrow_one(sampler: tuple) -> None:
    states = grammar_states(3)
    history = run_steps(sampler, states, 3, check_draws=True)
    # Step 0: every grammar row is new, so masked first. Row 0's first mask is wide (0.9): checked at step 1. Row 3
    # starts narrow (one token): masked first again at step 1. Row 1 (top_p) is always masked first.
    assert history[0][1] == [0, 1, 2, 3]
    assert 0 in history[1][2] and 3 in history[1][1] and 1 in history[1][1]


def test_the_fused_path_checks_a_row_next_if_its_unmasked_draw_was_allowed(sampler: tuple) -> None:
    sampler, device = sampler
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, VOCAB_SIZE, generator=generator) * 2).to(device)
    params = SamplingParams(temperature=0.8)  # temperature only: the fused path, where there is a Triton kernel
    rows = [SamplingRow(params, [1], [], sampling_seed=i) for i in range(6)]
    unmasked = sampler(logits, SamplingMetadata.build(rows, VOCAB_SIZE, device, eos_token_ids=())).sampled_token_ids
    # Rows 0-2 allow their unmasked draw (and little else), rows 3-5 allow half the vocabulary but not their draw.
    allowed = [{unmasked[i].item(), (unmasked[i].item() + 1) % VOCAB_SIZE} for i in range(3)]
    allowed += [set(range(0, VOCAB_SIZE, 2)) - {unmasked[i].item()} for i in range(3, 6)]
    states = [FakeState(params, FakeGrammar([tokens, set(range(VOCAB_SIZE))])) for tokens in allowed]

    grammar_sampling = GrammarSampling(6, VOCAB_SIZE, device)
    metadata = SamplingMetadata.build(rows, VOCAB_SIZE, device, eos_token_ids=())
    step = grammar_sampling.prepare(states, metadata)
    output = sampler(logits, metadata)
    grammar_sampling.finish(step, states, output.sampled_token_ids.tolist(), output, metadata, None)
    fused = output.unmasked_draws is not None
    assert fused == (sampler._use_triton is True)
    if fused:  # the unmasked draw decides
        assert [s.draw_checked for s in states] == [True] * 3 + [False] * 3
    else:  # the share the mask allowed decides: every row allows at least 1/64 (rows 0-2: 2 of the 128 bits)
        assert [s.draw_checked for s in states] == [True] * 6


def test_staging_reads_the_masks_it_filled() -> None:
    states = [FakeState(SamplingParams(), FakeGrammar([tokens])) for tokens in ({3, 40, 99}, set(range(50)))]
    staging = MaskStaging(4, VOCAB_SIZE, torch.device("cpu"))
    staging.fill([s.structured_output for s in states])
    assert staging.allows([40, 49]).tolist() == [True, True]
    assert staging.allows([41, 50]).tolist() == [False, False]
    fractions = staging.allowed_fractions(2)
    assert fractions.tolist() == pytest.approx([3 / 128, 50 / 128])  # of the 4 words' 128 bits


def test_a_row_whose_drawable_tokens_run_out_is_drawn_again_and_counts_as_changed(sampler: tuple) -> None:
    """Fewer than 16 finite scores: the candidates end in -1. If the grammar allows none of the finite ones, the
    row goes to the masked redraw, and the step reports a changed token (its logprobs must be recomputed)."""
    sampler, device = sampler
    logits = torch.full((1, VOCAB_SIZE), -math.inf)
    logits[0, :3] = torch.tensor([1.0, 0.5, 0.0])
    logits = logits.to(device)
    params = SamplingParams(temperature=1.0)
    states = [FakeState(params, FakeGrammar([{50}, set(range(VOCAB_SIZE))]))]
    states[0].draw_checked = True
    grammar_sampling = GrammarSampling(1, VOCAB_SIZE, device)
    metadata = SamplingMetadata.build([SamplingRow(params, [1], [], sampling_seed=0)], VOCAB_SIZE, device, eos_token_ids=())
    step = grammar_sampling.prepare(states, metadata)
    output = sampler(logits, metadata)
    assert output.candidates[0].tolist()[3:] == [-1] * (NUM_DRAW_CANDIDATES - 3)
    grammar_sampling.finish(step, states, output.sampled_token_ids.tolist(), output, metadata,
                            lambda m: sampler(logits, m))
    assert step.checked == [0] and step.redrawn == [0] and step.changed
    assert not states[0].draw_checked


def test_masked_rows_advance_at_the_next_prepare_but_stop_tokens_at_once() -> None:
    """A masked row's allowed token is accepted by its grammar at the next ``prepare`` (while the GPU runs the
    forward), in one batched call; a stop token ends the grammar in the step that drew it."""
    device = torch.device("cpu")
    params = SamplingParams(temperature=1.0)
    stop = 7
    states = [FakeState(params, FakeGrammar([{11}, {12}])), FakeState(params, FakeGrammar([{stop}]))]
    for state in states:
        state.structured_output.backend.stop_token_ids = frozenset({stop})
    matchers = [state.structured_output.matcher for state in states]
    grammar_sampling = GrammarSampling(2, VOCAB_SIZE, device)
    sampler = Sampler(use_triton=False)
    rows = [SamplingRow(params, [1], [], sampling_seed=i) for i in range(2)]
    metadata = SamplingMetadata.build(rows, VOCAB_SIZE, device, eos_token_ids=())
    step = grammar_sampling.prepare(states, metadata)
    output = sampler(torch.zeros(2, VOCAB_SIZE), metadata)
    sampled = grammar_sampling.finish(step, states, output.sampled_token_ids.tolist(), output, metadata, None)
    assert sampled == [11, stop]
    assert [m.position for m in matchers] == [0, 1]  # the stop token at once, the other deferred
    assert states[1].structured_output.is_terminated() and not states[0].structured_output.is_terminated()

    metadata = SamplingMetadata.build(rows[:1], VOCAB_SIZE, device, eos_token_ids=())
    grammar_sampling.prepare(states[:1], metadata)
    assert matchers[0].position == 1 and matchers[0].offers == 1
    assert sampler(torch.zeros(1, VOCAB_SIZE), metadata).sampled_token_ids.tolist() == [12]  # the mask of {12}


def test_masks_follow_rows_that_leave_join_and_move(sampler: tuple) -> None:
    """Rows leave the batch, join it and change places, between rows without a grammar; every step's tokens are the
    masked draws with the masks of the grammars' current positions (their tokens accepted one step late)."""
    sampler, device = sampler
    generator = torch.Generator().manual_seed(11)
    params = SamplingParams(temperature=1.0)

    def new_state() -> FakeState:  # 8 allowed tokens of 100 per position: a wrong mask shows
        allowed = [set(torch.randperm(VOCAB_SIZE, generator=generator)[:8].tolist()) for _ in range(8)]
        state = FakeState(params, FakeGrammar(allowed))
        state.structured_output.matcher.slow_masks = False  # masked first, every step
        return state

    pool = [new_state() for _ in range(7)]
    plain = FakeState(params, None)
    batches = [pool[:6], pool[:6] + [plain], [pool[0], pool[2], plain, pool[3], pool[5]],
               [pool[0], pool[6], pool[2], pool[3], pool[5]], [pool[5], pool[3], pool[6], plain, pool[0], pool[2]],
               [pool[5], pool[3], pool[6], pool[0], pool[2]]]
    grammar_sampling = GrammarSampling(8, VOCAB_SIZE, device)
    for step_index, batch in enumerate(batches):
        logits = (torch.randn(len(batch), VOCAB_SIZE, generator=generator) * 2).to(device)
        rows = [SamplingRow(params, [1], [], sampling_seed=100 * step_index + i) for i in range(len(batch))]
        metadata = SamplingMetadata.build(rows, VOCAB_SIZE, device, eos_token_ids=())
        step = grammar_sampling.prepare(batch, metadata)
        constrained = [row for row, state in enumerate(batch) if state.structured_output is not None]
        current = [batch[row].structured_output.matcher for row in constrained]
        current = [matcher.allowed[matcher.position] for matcher in current]
        output = sampler(logits, metadata)
        sampled = grammar_sampling.finish(step, batch, output.sampled_token_ids.tolist(), output, metadata,
                                          lambda m, logits=logits: sampler(logits, m))

        reference = SamplingMetadata.build(rows, VOCAB_SIZE, device, eos_token_ids=())
        reference.grammar_mask = GrammarMask(torch.tensor(constrained, device=device), bitmask_of(current).to(device))
        assert sampled == sampler(logits, reference).sampled_token_ids.tolist(), f"step {step_index}"
