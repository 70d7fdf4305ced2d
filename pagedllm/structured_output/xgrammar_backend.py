"""The xgrammar backend: JSON schema, any JSON, regex, choice and EBNF grammars, compiled with xgrammar."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from pagedllm.structured_output.backend import GrammarMatcher, StructuredOutputBackend
from pagedllm.structured_output.bounded_repeats import has_slow_repeats, rewrite_bounded_repeats

logger = logging.getLogger(__name__)

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and "Check failed: ... is false: ").
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


# Filling a bitmask can cost milliseconds per row in states where most tokens depend on the context (see
# bounded_repeats): the step's rows are filled by xgrammar's thread pool, capped so that it leaves cores to the engine
# loop and the tokenizer threads.
MAX_FILL_THREADS = 8


def clean_error(exc: BaseException) -> str:
    return _CPP_PREFIX.sub("", str(exc)).strip()


def default_fill_threads() -> int:
    """Half the cores this process may run on (at least one, at most ``MAX_FILL_THREADS``)."""
    return max(1, min(MAX_FILL_THREADS, len(os.sched_getaffinity(0)) // 2))


def with_fast_repeats(grammar: xgr.Grammar) -> xgr.Grammar:
    """``grammar`` with its counted character repetitions (bounded JSON strings...) as chains of rules, which
    xgrammar fills masks for ~40x faster (see ``bounded_repeats``); ``grammar`` itself when it has none, or when
    xgrammar cannot parse the rewritten text (not expected: it is xgrammar's own printout with rules added)."""
    ebnf = rewrite_bounded_repeats(str(grammar))
    if ebnf is None:
        return grammar
    try:
        return xgr.Grammar.from_ebnf(ebnf)
    except (RuntimeError, ValueError) as exc:
        logger.warning("kept a grammar's counted repetitions: its rewrite does not parse (%s)", clean_error(exc))
        return grammar


@dataclass(frozen=True, slots=True)
class XgrammarCompiled:
    grammar: xgr.CompiledGrammar
    slow_masks: bool  # it kept a long counted repetition, where a mask can take milliseconds to fill


def parse_spec(kind: str, spec: Any) -> xgr.Grammar:
    """Check a (kind, spec) pair and turn it into an xgrammar grammar; ValueError on a bad spec."""
    try:
        if kind == "json":
            schema = spec if isinstance(spec, str) else json.dumps(spec)
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            # JSON string escaping is also valid EBNF string-literal escaping.
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in spec))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        if isinstance(exc, RecursionError):
            raise ValueError(f"structured_outputs.{kind} is too deeply nested") from None
        raise ValueError(f"structured_outputs.{kind} is invalid: {clean_error(exc)}") from None
    raise ValueError(f"structured_outputs kind {kind!r} is not supported by the xgrammar backend")


def compile_parsed(compiler: xgr.GrammarCompiler, grammar: xgr.Grammar) -> XgrammarCompiled:
    """Compile a parsed grammar against ``compiler``'s vocabulary (its counted repetitions made fast first)."""
    fast = with_fast_repeats(grammar)
    try:
        return XgrammarCompiled(compiler.compile_grammar(fast), has_slow_repeats(str(fast)))
    except RuntimeError as exc:
        if isinstance(exc, RecursionError):
            raise ValueError("structured_outputs grammar is too deeply nested") from None
        raise ValueError(f"structured_outputs grammar does not compile: {clean_error(exc)}") from None


def worker_setup(payload: str, num_threads: int) -> Callable[[str, Any, Callable[[], None]], tuple[str, bool]]:
    """In a compile worker process: rebuild the vocabulary from ``XgrammarBackend.worker_payload()`` once, and
    return the function that compiles one spec there into ``(serialized grammar, slow_masks)``."""
    start = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(payload), max_threads=num_threads,
                                   cache_enabled=False)  # the parent caches; a worker's cache would only grow
    logger.debug("compile worker ready in %.3f s", time.perf_counter() - start)

    def compile_serialized(kind: str, spec: Any, report_parsed: Callable[[], None]) -> tuple[str, bool]:
        grammar = parse_spec(kind, spec)
        report_parsed()
        compiled = compile_parsed(compiler, grammar)
        return compiled.grammar.serialize_json(), compiled.slow_masks

    return compile_serialized


class XgrammarMatcher(GrammarMatcher):
    """One sequence's position in an xgrammar compiled grammar."""

    __slots__ = ("_rejected", "slow_masks", "xgr_matcher")

    def __init__(self, compiled: XgrammarCompiled) -> None:
        self.xgr_matcher = xgr.GrammarMatcher(compiled.grammar)
        self.slow_masks = compiled.slow_masks
        self._rejected = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.xgr_matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        accepted = self.xgr_matcher.accept_token(token_id)
        self._rejected |= not accepted
        return accepted

    def try_accept_token(self, token_id: int) -> bool:
        return self.xgr_matcher.accept_token(token_id)  # a rejected token leaves an xgrammar matcher unchanged

    def is_terminated(self) -> bool:
        # A rejected token (possible only when another rule, e.g. a min_tokens ban, removed every allowed
        # token) ends the sequence too: no continuation can satisfy the grammar any more.
        return self._rejected or self.xgr_matcher.is_terminated()


class XgrammarBackend(StructuredOutputBackend):
    """Grammars over a Hugging Face tokenizer's vocabulary, padded to the model's ``vocab_size``."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: list[int],
        max_threads: int = 2,
        fill_threads: int | None = None,
    ) -> None:
        """``max_threads`` compile grammars; ``fill_threads`` (None: ``default_fill_threads()``) fill bitmasks."""
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._info = info
        self._stop_token_ids = frozenset(info.stop_token_ids)
        # Ids with no text (the model's padding rows past the tokenizer): never accepted, and xgrammar logs a
        # warning for each one offered, which drawn-then-checked candidates can be.
        self._never_accepted = frozenset(info.special_token_ids) - self._stop_token_ids
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads)
        self._batch_matcher = xgr.BatchGrammarMatcher(fill_threads or default_fill_threads())

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_token_ids

    def parse(self, kind: str, spec: Any) -> xgr.Grammar:
        return parse_spec(kind, spec)

    def compile(self, grammar: xgr.Grammar) -> XgrammarCompiled:
        return compile_parsed(self._compiler, grammar)

    @property
    def worker_setup(self) -> Callable[[str, int], Callable]:
        return worker_setup

    def worker_payload(self) -> str:
        """What a compile worker process needs to rebuild this vocabulary's tables (``worker_setup``)."""
        return self._info.serialize_json()

    def load_compiled(self, serialized: str, slow_masks: bool) -> XgrammarCompiled:
        """A grammar compiled in a worker process (``serialize_json`` there), bound to this vocabulary."""
        return XgrammarCompiled(xgr.CompiledGrammar.deserialize_json(serialized, self._info), slow_masks)

    def new_matcher(self, compiled: XgrammarCompiled) -> GrammarMatcher:
        return XgrammarMatcher(compiled)

    def fill_bitmasks(self, matchers: list[XgrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """All rows in one call into xgrammar, which fills them in parallel (called from one thread at a time)."""
        xgr_matchers = [matcher.xgr_matcher for matcher in matchers]
        self._batch_matcher.batch_fill_next_token_bitmask(xgr_matchers, bitmask, rows)

    def try_accept_tokens(self, matchers: list[XgrammarMatcher], token_ids: list[int]) -> list[bool]:
        """One call into xgrammar for all rows (a rejected token leaves its matcher unchanged)."""
        offered = [i for i, token_id in enumerate(token_ids) if token_id not in self._never_accepted]
        results = xgr.BatchGrammarMatcher.batch_accept_token(
            [matchers[i].xgr_matcher for i in offered], [token_ids[i] for i in offered]
        )
        if len(offered) == len(token_ids):
            return results
        accepted = [False] * len(token_ids)
        for i, result in zip(offered, results):
            accepted[i] = result
        return accepted
