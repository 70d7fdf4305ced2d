"""The rows of a step under a grammar: each is masked before its draw, or checked after it.

Most rows are masked first: their token bitmasks are filled while the GPU runs the forward (xgrammar fills most
masks in microseconds, from tables made at compile time; bounded strings are rewritten so that theirs are too, see
``structured_output/bounded_repeats``), and their tokens advance their grammars at the next step's ``prepare``,
again while the GPU works, except stop tokens and tokens outside the mask, which end the request and are accepted
at once.

Some grammars keep states where xgrammar tries most of the vocabulary token by token (a string with a ``maxLength``
too long to rewrite, xgrammar's issue #852): 0.5 to 10 ms for one row, longer than the forward, and a step waits for
its slowest row. Rows of such grammars (``GrammarMatcher.slow_masks``) are *checked* after their draw where they can
be. The sampler draws a row by the exponential race: the token of largest score ``logit / temperature - log E``
(``E`` the row's Exponential(1) noise; a greedy row has no noise), and a row under a grammar is drawn the same way
over its allowed tokens, with the same noise. So the masked draw is the first allowed token in the order of
decreasing score; when the grammar allows the unmasked draw, it is the masked draw. A checked row is drawn without
a mask, and the sampler also returns its ``NUM_DRAW_CANDIDATES`` (16) best-scoring tokens, best first; the host
offers them to the grammar in that order, and the first it accepts is the row's token: the token the mask would
have given, without the mask. Only when the grammar takes none of them is the mask filled and the row drawn again,
masked (that step then syncs twice).

Only a row whose mask is the last change to its scores can be checked: the filters that look at the distribution
(top_k, top_p, min_p) would keep other tokens once the mask removed some, so those rows are always masked first.
(logit_bias, min_tokens bans and penalties act before the mask, so they change nothing here.)

Which way a slow grammar's row goes. A check that fails costs a mask filled after the draw, while the GPU waits, and
a second draw. So a row is checked only where its draw is likely to be allowed: a new row starts masked first; a row
masked first is checked at its next step if its unmasked draw was allowed (the fused sampling kernel draws every row
unmasked first, so this is known for free; elsewhere, if its mask allowed at least 1/64 of the vocabulary: a
structural position in JSON, where few tokens fit, allows less); a checked row stays checked while its draws are
accepted, and one whose candidates all fail is masked first at its next step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pagedllm.params import SamplingParams
from pagedllm.staged_buffer import StagedBuffer
from pagedllm.structured_output.manager import accept_deferred_tokens, accept_tokens, try_accept_tokens
from pagedllm.worker.grammar_masks import MaskStaging
from pagedllm.worker.sampler import GrammarMask, SamplerOutput, SamplingMetadata

# A row whose mask allows less than this share of the vocabulary is masked first at its next step.
MIN_ALLOWED_FRACTION_TO_CHECK = 1 / 64


def can_check_after_draw(params: SamplingParams) -> bool:
    """Whether the grammar's mask would be the last change to the row's scores (no top_k, top_p or min_p)."""
    return params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0


@dataclass(slots=True)
class GrammarStep:
    """The rows of one step under a grammar (batch rows), split by how they are sampled."""

    masked: list[int]  # their masks filled before the draw
    checked: list[int]  # drawn without a mask, their candidates offered to the grammar after the draw
    redrawn: list[int] = dataclasses.field(default_factory=list)  # checked rows the grammar took no candidate of
    changed: bool = False  # whether some checked row's token is not its unmasked draw


class GrammarSampling:
    """The grammar side of sampling: masks before the draw, checks after it (see the module docstring).

    A row's way for its next step is kept on its runner state (``draw_checked``, False for a new row).
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device, check_draws: bool = True) -> None:
        """``max_rows``: the most rows a step samples (``max_num_seqs``)."""
        self.check_draws = check_draws  # False: every row is masked first (the reference the tests compare with)
        self._staging = MaskStaging(max_rows, vocab_size, device)  # staging row i: the mask of the i-th masked row
        self._mask_rows = StagedBuffer((max_rows,), torch.int64, device)  # batch row of each mask
        self._checked_rows = StagedBuffer((max_rows,), torch.int64, device)
        # Draws so far: masked before the draw, checked after it, and of those drawn again with the mask.
        self.num_masked = self.num_checked = self.num_redrawn = 0

    def prepare(self, states: list[Any], metadata: SamplingMetadata) -> GrammarStep | None:
        """Split the step's rows under a grammar; fill the masks of those masked first (``metadata.grammar_mask``)
        and name those checked after the draw (``metadata.checked_rows``). None when no row has a grammar."""
        # A complete grammar constrains nothing more: its row can only be a step past its end under async scheduling
        # (scheduled before the token that completed it was known), and that row's token is dropped.
        rows = [row for row, state in enumerate(states)
                if state.structured_output is not None and not state.structured_output.is_terminated()]
        if not rows:
            return None
        accept_deferred_tokens([states[row].structured_output for row in rows])
        step = GrammarStep([], [])
        for row in rows:
            (step.checked if self._checks(states[row]) else step.masked).append(row)
        self.num_masked += len(step.masked)
        self.num_checked += len(step.checked)
        if step.masked:
            metadata.grammar_mask = self._fill_masks(states, step.masked)
        if step.checked:
            self._checked_rows.np[: len(step.checked)] = step.checked
            metadata.checked_rows = self._checked_rows.upload(len(step.checked))
        return step

    def finish(
        self,
        step: GrammarStep,
        states: list[Any],
        sampled: list[int],
        output: SamplerOutput,
        metadata: SamplingMetadata,
        sample: Callable[[SamplingMetadata], SamplerOutput],
    ) -> list[int]:
        """The step's tokens (``sampled``, the first draw, updated in place): each checked row's first candidate its
        grammar accepts, or its draw again with its mask (``sample`` runs the sampler on the step's logits); every
        row's grammar advanced by its token (a masked row's at the next ``prepare``, see ``_commit_masked``)."""
        self._commit_masked(states, step, sampled)
        self._after_masked_draws(step, states, output)
        if step.checked:
            self._offer_candidates(step, states, sampled, output.candidates.tolist())
        if step.redrawn:
            self.num_redrawn += len(step.redrawn)
            for row in step.redrawn:
                states[row].draw_checked = False
            mask = self._fill_masks(states, step.redrawn)
            redraw = sample(dataclasses.replace(metadata, grammar_mask=mask, checked_rows=None))
            tokens = redraw.sampled_token_ids.tolist()  # a second sync, only on a step with such a row
            for row in step.redrawn:
                sampled[row] = tokens[row]
            self._accept(states, step.redrawn, sampled)
        return sampled

    def _checks(self, state: Any) -> bool:
        """Whether the row is checked after its draw this step (rather than masked first)."""
        return (self.check_draws and state.draw_checked and state.structured_output.slow_masks
                and can_check_after_draw(state.sampling_params))

    def _fill_masks(self, states: list[Any], rows: list[int]) -> GrammarMask:
        """Fill the masks of ``rows`` (staging row i: ``rows[i]``) and upload them."""
        self._staging.fill([states[row].structured_output for row in rows])
        self._mask_rows.np[: len(rows)] = rows
        return GrammarMask(self._mask_rows.upload(len(rows)), self._staging.upload(len(rows)))

    def _commit_masked(self, states: list[Any], step: GrammarStep, sampled: list[int]) -> None:
        """Advance the masked rows' grammars by their tokens. Those the mask allowed, other than stop tokens, are
        accepted at the next ``prepare``, which runs while the GPU computes the next forward: here the GPU would
        wait. Stop tokens (which end the grammar, and so the request) and tokens outside the mask (possible only
        when other rules banned every allowed token, and which reject the grammar) are accepted now."""
        if not step.masked:
            return
        tokens = [sampled[row] for row in step.masked]
        now = []
        for row, token, allowed in zip(step.masked, tokens, self._staging.allows(tokens).tolist()):
            grammar = states[row].structured_output
            if allowed and token not in grammar.backend.stop_token_ids:
                grammar.accept_token_later(token)
            else:
                now.append(row)
        self._accept(states, now, sampled)

    def _after_masked_draws(self, step: GrammarStep, states: list[Any], output: SamplerOutput) -> None:
        """Each masked row's way at its next step: checked if its unmasked draw was allowed (read from the masks of
        this step, still in the staging buffer) or, where that draw is unknown, if its mask allowed enough. Only
        rows of grammars with slow masks are ever checked."""
        if not self.check_draws or not any(states[row].structured_output.slow_masks for row in step.masked):
            return
        if output.unmasked_draws is not None:
            allowed = self._staging.allows(output.unmasked_draws.tolist()).tolist()
        else:
            allowed = (self._staging.allowed_fractions(len(step.masked)) >= MIN_ALLOWED_FRACTION_TO_CHECK).tolist()
        for row, checks in zip(step.masked, allowed):
            states[row].draw_checked = checks

    @staticmethod
    def _accept(states: list[Any], rows: list[int], sampled: list[int]) -> None:
        if rows:
            accept_tokens([states[row].structured_output for row in rows], [sampled[row] for row in rows])

    def _offer_candidates(
        self, step: GrammarStep, states: list[Any], sampled: list[int], candidates: list[list[int]]
    ) -> None:
        """Offer each checked row its candidates in order, one round per rank (one batched call into the grammar
        backend per round); rows that accept one keep being checked, the others go to ``step.redrawn``."""
        pending = list(range(len(step.checked)))  # indices into step.checked
        for rank in range(len(candidates[0])):
            # -1: only -inf scores from here on, so the row's grammar allows none of its drawable tokens in this list.
            step.redrawn.extend(step.checked[i] for i in pending if candidates[i][rank] < 0)
            pending = [i for i in pending if candidates[i][rank] >= 0]
            if not pending:
                break
            grammars = [states[step.checked[i]].structured_output for i in pending]
            accepted = try_accept_tokens(grammars, [candidates[i][rank] for i in pending])
            rejected = []
            for i, was_accepted in zip(pending, accepted):
                if was_accepted:
                    step.changed |= rank > 0
                    sampled[step.checked[i]] = candidates[i][rank]
                else:
                    rejected.append(i)
            pending = rejected
        step.redrawn.extend(step.checked[i] for i in pending)
        step.changed |= bool(step.redrawn)
