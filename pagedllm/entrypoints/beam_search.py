"""Beam search on top of the engine, with the same selection rules as HF transformers' ``num_beams`` search.

Each step runs every live beam as a one-token request that asks for its top-K logprobs; the beams' shared
prefixes are not recomputed because prefix caching finds their full KV blocks (blocks are shared, not copied).
The selection follows ``transformers.GenerationMixin._beam_search`` (``early_stopping=False``):

- the K = max(2, 1 + number of eos ids) * width best continuations over all beams, by cumulative logprob;
- those ending in eos, or reaching ``max_tokens``, are "done"; the best ``width`` continuations not done run on;
- done continuations ranked in the first ``width`` become finished hypotheses, scored
  ``cumulative logprob / generated_length ** length_penalty``; the best ``width`` hypotheses are kept;
- the search stops when no running beam can beat the worst kept hypothesis (``best running logprob /
  current_length ** length_penalty``, HF's heuristic), or when every continuation is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.params import BeamSearchParams, RequestOutput, RequestOutputKind, SamplingParams

NEG_INF = -1.0e9


@dataclass
class BeamSearchSequence:
    """One finished hypothesis: generated tokens, their logprobs, and its length-penalized score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str  # "stop" (eos) or "length"
    text: str = ""


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` hypotheses of one prompt, best first."""

    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence] = field(default_factory=list)


@dataclass(slots=True)
class _Beam:
    token_ids: list[int]  # generated so far
    logprob: float  # cumulative


class BeamSearchState:
    """The beam search of one prompt: feed it each live beam's top-K logprobs, step by step."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: tuple[int, ...]):
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.num_candidates = max(2, 1 + len(self.eos_token_ids)) * params.beam_width
        self.running = [_Beam([], 0.0)]  # HF starts with one live beam (the others at -1e9 never win)
        self.finished: list[BeamSearchSequence] = []
        self.done = False

    def beam_prompts(self) -> list[list[int]]:
        """The token ids each live beam needs the next-token logprobs of."""
        return [self.prompt_token_ids + beam.token_ids for beam in self.running]

    def advance(self, top_logprobs: list[dict[int, float]]) -> None:
        """One step, given for each live beam (in ``beam_prompts`` order) its top-K next-token logprobs."""
        candidates = sorted(
            ((beam.logprob + logprob, beam, token) for beam, tops in zip(self.running, top_logprobs)
             for token, logprob in tops.items()),
            key=lambda c: c[0],
            reverse=True,
        )[: self.num_candidates]
        length = len(self.running[0].token_ids) + 1
        is_done = [token in self.eos_token_ids or length >= self.params.max_tokens for _, _, token in candidates]
        self._keep_finished(candidates, is_done, length)
        live = [(score, beam, token) for (score, beam, token), done in zip(candidates, is_done) if not done]
        self.running = [_Beam(beam.token_ids + [token], score) for score, beam, token in live[: self.params.beam_width]]
        self.done = not self.running or not self._can_improve(length)

    def _keep_finished(self, candidates: list, is_done: list[bool], length: int) -> None:
        width = self.params.beam_width
        for rank, ((logprob, beam, token), done) in enumerate(zip(candidates, is_done)):
            if done and rank < width:
                reason = "stop" if token in self.eos_token_ids else "length"
                score = logprob / length**self.params.length_penalty
                self.finished.append(BeamSearchSequence(beam.token_ids + [token], logprob, score, reason))
        self.finished = sorted(self.finished, key=lambda s: s.score, reverse=True)[:width]

    def _can_improve(self, length: int) -> bool:
        if len(self.finished) < self.params.beam_width:
            return True
        best_possible = self.running[0].logprob / length**self.params.length_penalty
        return best_possible > min(s.score for s in self.finished)

    def output(self) -> BeamSearchOutput:
        return BeamSearchOutput(self.prompt_token_ids, list(self.finished))


@dataclass
class BeamSearchStep:
    """One step of some beam searches: every live beam of every unfinished search as a one-token request.

    Whoever runs the requests (``LLM.beam_search`` synchronously, the server through the async engine) builds the
    step with ``BeamSearchStep.of``, runs ``prompts`` with ``params``, and hands the outputs, in order, to ``advance``.
    """

    states: list[BeamSearchState]  # the unfinished searches this step advances
    owners: list[BeamSearchState]  # the search of each request
    prompts: list[dict]  # one {"prompt_token_ids": prompt + beam} per request
    params: SamplingParams  # greedy, one token, the top-K next-token logprobs, no text

    @classmethod
    def of(cls, states: list[BeamSearchState]) -> BeamSearchStep | None:
        """The next step of ``states``, or None when every search is done."""
        live = [state for state in states if not state.done]
        if not live:
            return None
        owners, prompts = [], []
        for state in live:
            for token_ids in state.beam_prompts():
                owners.append(state)
                prompts.append({"prompt_token_ids": token_ids})
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False,
                                logprobs=max(state.num_candidates for state in live),
                                output_kind=RequestOutputKind.FINAL_ONLY)
        return cls(live, owners, prompts, params)

    def advance(self, outputs: list[RequestOutput]) -> None:
        """Feed each search the finished outputs of its beams' requests (``outputs`` in ``prompts`` order)."""
        for state in self.states:
            mine = [output for owner, output in zip(self.owners, outputs) if owner is state]
            state.advance([_top_logprobs(output, state.num_candidates) for output in mine])


def _top_logprobs(output: RequestOutput, num: int) -> dict[int, float]:
    """The top ``num`` next-token logprobs of a one-token request (its sampled token may rank below them)."""
    entry = output.outputs[0].logprobs[0]
    return {token_id: logprob.logprob for token_id, logprob in entry.items() if logprob.rank <= num}


def decode_sequences(output: BeamSearchOutput, tokenizer, skip_special_tokens: bool = True) -> BeamSearchOutput:
    """Fill in each sequence's ``text`` (left empty without a tokenizer)."""
    if tokenizer is not None:
        for sequence in output.sequences:
            sequence.text = tokenizer.decode(sequence.token_ids, skip_special_tokens=skip_special_tokens)
    return output
