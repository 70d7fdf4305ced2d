"""Structured outputs for the engine: compile grammars off the engine loop, one matcher per sequence.

``StructuredOutputManager.new_request`` parses the spec right away (bad specs raise ValueError at add time, with
a bounded wait) and starts compiling it against the vocabulary in a worker thread; compiled grammars are cached by
(kind, spec). Each sequence gets a ``StructuredOutputRequest``: the scheduler holds a waiting request back while
``is_ready()`` is False, the model runner fills its bitmask row before sampling and advances it with each sampled
token, and the scheduler finishes the request ("stop") when ``is_terminated()``. The matcher lives on this object,
not in the runner, so it survives preemption: the tokens it has accepted are exactly the request's outputs.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any

import torch

from pagedllm.params import StructuredOutputsParams
from pagedllm.structured_output.backend import GrammarMatcher, StructuredOutputBackend

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 30.0


class StructuredOutputRequest:
    """One sequence's grammar: pending until compiled, then a matcher (made on first use)."""

    __slots__ = ("_backend", "_deadline", "_deferred_token", "_future", "_matcher", "error")

    def __init__(self, backend: StructuredOutputBackend, future: concurrent.futures.Future, deadline: float) -> None:
        self._backend = backend
        self._future = future
        self._deadline = deadline
        self._matcher: GrammarMatcher | None = None
        self._deferred_token: int | None = None  # accepted at the matcher's next use (``accept_token_later``)
        self.error: str | None = None  # set when compiling failed or timed out: the request cannot run

    def is_ready(self) -> bool:
        """True once the grammar compiled, or failed (see ``error``): the scheduler may stop waiting."""
        if self._matcher is not None or self.error is not None:
            return True
        if self._future.done():
            exc = self._future.exception()
            if exc is not None:
                self.error = str(exc)
            return True
        if time.monotonic() > self._deadline:
            self.error = "structured_outputs grammar compilation timed out"
            return True
        return False

    @property
    def backend(self) -> StructuredOutputBackend:
        return self._backend

    @property
    def matcher(self) -> GrammarMatcher:
        """The matcher, advanced by the deferred token if there is one."""
        if self._matcher is None:
            self._matcher = self._backend.new_matcher(self._future.result())
        if self._deferred_token is not None:
            self._matcher.accept_token(self.take_deferred_token())
        return self._matcher

    @property
    def slow_masks(self) -> bool:
        """``GrammarMatcher.slow_masks`` (False before the matcher exists); does not accept a deferred token."""
        return self._matcher is not None and self._matcher.slow_masks

    def accept_token_later(self, token_id: int) -> None:
        """Advance by ``token_id`` at the matcher's next use instead of now; only for a token the grammar allows
        that is not a stop token, which cannot terminate it, so ``is_terminated()`` is the same either way. (The
        runner defers the step's tokens so that the grammars advance while the GPU runs the next forward.)"""
        if self._deferred_token is not None:
            self.accept_token(self.take_deferred_token())
        self._deferred_token = token_id

    def take_deferred_token(self) -> int | None:
        token_id, self._deferred_token = self._deferred_token, None
        return token_id

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def try_accept_token(self, token_id: int) -> bool:
        return self.matcher.try_accept_token(token_id)

    def is_terminated(self) -> bool:
        return self._matcher is not None and self._matcher.is_terminated()  # a deferred token would not change it


def fill_bitmasks(grammars: list[StructuredOutputRequest], bitmask: torch.Tensor) -> None:
    """Row i of ``bitmask`` <- the allowed next tokens of ``grammars[i]``: one batched call per backend (there is
    one backend per engine, so one call per step)."""
    by_backend: dict[StructuredOutputBackend, tuple[list[GrammarMatcher], list[int]]] = {}
    for row, grammar in enumerate(grammars):
        matchers, rows = by_backend.setdefault(grammar.backend, ([], []))
        matchers.append(grammar.matcher)
        rows.append(row)
    for backend, (matchers, rows) in by_backend.items():
        backend.fill_bitmasks(matchers, bitmask, rows)


def accept_tokens(grammars: list[StructuredOutputRequest], token_ids: list[int]) -> None:
    """``grammars[i].accept_token(token_ids[i])`` for every i, in batched calls (a rejected token is offered again
    alone, which marks its sequence rejected: rare, since tokens are drawn from what the grammar allows)."""
    for grammar, token_id, accepted in zip(grammars, token_ids, try_accept_tokens(grammars, token_ids)):
        if not accepted:
            grammar.accept_token(token_id)


def accept_deferred_tokens(grammars: list[StructuredOutputRequest]) -> None:
    """Advance each of ``grammars`` that holds a deferred token by it, in batched calls."""
    waiting = [grammar for grammar in grammars if grammar._deferred_token is not None]
    if waiting:
        accept_tokens(waiting, [grammar.take_deferred_token() for grammar in waiting])


def try_accept_tokens(grammars: list[StructuredOutputRequest], token_ids: list[int]) -> list[bool]:
    """Offer ``token_ids[i]`` to ``grammars[i]`` (advanced if allowed, else left as it was): which were accepted.
    One batched call per backend."""
    by_backend: dict[StructuredOutputBackend, list[int]] = {}
    for index, grammar in enumerate(grammars):
        by_backend.setdefault(grammar.backend, []).append(index)
    accepted = [False] * len(grammars)
    for backend, indices in by_backend.items():
        results = backend.try_accept_tokens([grammars[i].matcher for i in indices], [token_ids[i] for i in indices])
        for index, result in zip(indices, results):
            accepted[index] = result
    return accepted


class StructuredOutputManager:
    """Owns the backend (made lazily: building the vocabulary tables costs time), the compile threads and the cache."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: list[int],
        backend: str = "xgrammar",
        num_threads: int = 2,
        compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
    ) -> None:
        if backend != "xgrammar":
            raise ValueError(f"structured output backend must be 'xgrammar', got {backend!r}")
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._num_threads = num_threads
        self.compile_timeout_s = compile_timeout_s
        self._backend: StructuredOutputBackend | None = None
        self._backend_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="pagedllm-grammar")
        self._cache: dict[tuple[str, str], concurrent.futures.Future] = {}

    @property
    def backend(self) -> StructuredOutputBackend:
        with self._backend_lock:
            if self._backend is None:
                from pagedllm.structured_output.xgrammar_backend import XgrammarBackend

                self._backend = XgrammarBackend(
                    self._tokenizer, self._vocab_size, self._stop_token_ids, max_threads=self._num_threads
                )
            return self._backend

    def prepare(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """Parse the spec (ValueError on a bad spec or a slow parse) and start compiling it, or find it in the
        cache: the future of the compiled grammar (its exception is a ValueError when compiling fails)."""
        key = (params.kind, params.spec_key)
        future = self._cache.get(key)
        if future is None or (future.done() and future.exception() is not None):
            grammar = self._parse(params)
            future = self._pool.submit(self._compile, grammar)
            self._cache[key] = future
        return future

    def new_requests(self, params: StructuredOutputsParams, num_sequences: int) -> list[StructuredOutputRequest]:
        """One grammar object per sequence, sharing one compilation; ValueError on a bad spec or a slow parse."""
        future = self.prepare(params)
        deadline = time.monotonic() + self.compile_timeout_s
        return [StructuredOutputRequest(self.backend, future, deadline) for _ in range(num_sequences)]

    def _parse(self, params: StructuredOutputsParams) -> Any:
        future = self._pool.submit(lambda: self.backend.parse(params.kind, getattr(params, params.kind)))
        try:
            return future.result(timeout=self.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise ValueError(
                f"structured_outputs.{params.kind} took longer than {self.compile_timeout_s:g} s to parse"
            ) from None

    def _compile(self, grammar: Any) -> Any:
        start = time.perf_counter()
        compiled = self.backend.compile(grammar)
        logger.debug("grammar compiled in %.3f s", time.perf_counter() - start)
        return compiled

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
