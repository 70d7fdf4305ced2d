"""The grammar-engine interface: what the structured-output manager needs from a backend (xgrammar, llguidance...).

A backend turns a (kind, spec) pair into a compiled grammar in two phases: ``parse`` (fast, no vocabulary: catches
bad specs at add time) and ``compile`` (against the tokenizer's vocabulary: the slow part, run off the engine
loop). A ``GrammarMatcher`` then follows one sequence: it fills that sequence's row of the token bitmask and
advances with each accepted token. ``fill_bitmasks`` fills the rows of a whole step at once and
``try_accept_tokens`` offers one token to each of many matchers: a backend with a batch API (xgrammar's) overrides
them; the defaults loop over the rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row: bit ``i % 32`` of word ``i // 32`` set = token ``i`` allowed."""
    return -(-vocab_size // 32)


class GrammarMatcher(ABC):
    """The state of one sequence inside a compiled grammar."""

    # Whether filling this matcher's masks can take milliseconds (the grammar has states the backend checks token by
    # token): its rows are then better drawn first and checked after the draw (worker/grammar_sampling.py).
    slow_masks: bool = False

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 CPU tensor, ``bitmask_width`` words)."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it (the sequence can then only end:
        ``is_terminated()`` is True)."""

    @abstractmethod
    def try_accept_token(self, token_id: int) -> bool:
        """Advance by one token if the grammar allows it; otherwise return False and leave the matcher as it was."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether the sequence must end: the grammar accepted a stop token, or rejected a token. (Nothing else
        terminates a matcher, so an allowed token that is not a stop token never changes this.)"""


class StructuredOutputBackend(ABC):
    """Compiles grammar specs against one tokenizer's vocabulary and makes matchers."""

    @property
    @abstractmethod
    def stop_token_ids(self) -> frozenset[int]:
        """The tokens that complete a grammar (accepting one terminates its matcher)."""

    @abstractmethod
    def parse(self, kind: str, spec: Any) -> Any:
        """Check a spec and turn it into the backend's grammar object; ValueError on a bad spec."""

    @abstractmethod
    def compile(self, grammar: Any) -> Any:
        """Compile a parsed grammar against the vocabulary, in this process (the manager compiles in worker
        processes instead: ``worker_setup``)."""

    @property
    @abstractmethod
    def worker_setup(self) -> Callable[[str, int], Callable]:
        """A module-level function (a worker process imports it by name): ``setup(payload, num_threads)`` builds the
        compiler in a compile worker and returns ``compile(kind, spec, report_parsed) -> (serialized, slow_masks)``,
        which raises ValueError on a bad spec and calls ``report_parsed()`` once the spec parsed."""

    @abstractmethod
    def worker_payload(self) -> str:
        """What ``worker_setup`` needs to rebuild this backend's vocabulary in another process."""

    @abstractmethod
    def load_compiled(self, serialized: Any, slow_masks: bool) -> Any:
        """A grammar compiled in a worker process, loaded here (the object ``new_matcher`` takes)."""

    @abstractmethod
    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher at the start of a compiled grammar."""

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Write the allowed next tokens of ``matchers[i]`` into ``bitmask[rows[i]]`` (matchers made by this backend)."""
        for matcher, row in zip(matchers, rows):
            matcher.fill_bitmask(bitmask, row)

    def try_accept_tokens(self, matchers: list[GrammarMatcher], token_ids: list[int]) -> list[bool]:
        """``matchers[i].try_accept_token(token_ids[i])`` for every i (matchers made by this backend)."""
        return [matcher.try_accept_token(token_id) for matcher, token_id in zip(matchers, token_ids)]
