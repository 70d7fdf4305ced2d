"""Structured outputs for the engine: compile grammars off the engine loop, one matcher per sequence.

``StructuredOutputManager.new_request`` parses the spec right away (bad specs raise ValueError at add time, with
a bounded wait) and starts compiling it against the vocabulary in a worker thread; compiled grammars are cached by
(kind, spec). Each sequence gets a ``StructuredOutputRequest``: the scheduler holds a waiting request back while
``is_ready()`` is False, the model runner fills its bitmask row before sampling and advances it with each sampled
token, and the scheduler finishes the request ("stop") when ``is_terminated()``. The matcher lives on this object,
not in the runner, so it survives preemption: the tokens it has accepted are exactly the request's outputs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from pagedllm.config import EngineConfig
from pagedllm.params import StructuredOutputsParams
from pagedllm.structured_output.backend import GrammarMatcher, StructuredOutputBackend
from pagedllm.structured_output.compile_pool import (
    CompileJob,
    CompilePool,
    CompileTimeout,
    GrammarCompileAbandoned,
    timeout_message,
    too_deep_message,
)

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 30.0
DEFAULT_MAX_PENDING_PER_CLIENT = 4
DEFAULT_CACHE_MAX_BYTES = 64 << 20
DEFAULT_FAILURE_TTL_S = 10.0
# new_requests waits for a parse a little past the compile deadline: the pool fails the job at the deadline itself.
_PARSE_WAIT_SLACK_S = 1.0


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


class GrammarQueueFull(Exception):
    """A client already has ``max_pending_per_client`` grammars compiling: the server answers 429."""


@dataclass(eq=False)
class _CacheEntry:
    """A compile, pending or done, and the bytes it holds in the cache once done (its serialized size)."""

    job: CompileJob
    num_bytes: int = 0
    failed_at: float | None = None


class StructuredOutputManager:
    """Owns the backend (made lazily: building the vocabulary tables costs time), the compile worker processes
    (``compile_pool``), the per-client limit on pending compiles and the cache of compiled grammars.

    The cache is an LRU bounded by ``cache_max_bytes`` (a compiled grammar counts its serialized size); a failed
    compile is remembered for ``failure_ttl_s`` only, so that a client repeating a spec that timed out does not
    occupy a worker each time, yet the spec can be tried again later. Requests for a spec being compiled share
    that compile."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: list[int],
        backend: str = "xgrammar",
        num_workers: int = 2,
        compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        max_pending_per_client: int = DEFAULT_MAX_PENDING_PER_CLIENT,
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        failure_ttl_s: float = DEFAULT_FAILURE_TTL_S,
    ) -> None:
        if backend != "xgrammar":
            raise ValueError(f"structured output backend must be 'xgrammar', got {backend!r}")
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._num_workers = num_workers
        self.compile_timeout_s = compile_timeout_s
        self.max_pending_per_client = max_pending_per_client
        self.cache_max_bytes = cache_max_bytes
        self.failure_ttl_s = failure_ttl_s
        self._backend: StructuredOutputBackend | None = None
        self._pool: CompilePool | None = None
        self._lock = threading.RLock()
        self._cache: collections.OrderedDict[tuple[str, str], _CacheEntry] = collections.OrderedDict()
        self._cache_bytes = 0
        self._pending_by_client: dict[str, int] = {}
        self._is_shut_down = False

    @classmethod
    def for_engine(cls, tokenizer, config: EngineConfig) -> StructuredOutputManager:
        """The manager of an engine built from ``config``: its vocabulary, end-of-sequence ids and compile settings."""
        settings = config.structured_outputs_config
        return cls(tokenizer, config.model_config.vocab_size, list(config.model_config.eos_token_ids),
                   compile_timeout_s=settings.compile_timeout_s,
                   max_pending_per_client=settings.max_pending_per_client)

    @property
    def backend(self) -> StructuredOutputBackend:
        with self._lock:
            if self._backend is None:
                from pagedllm.structured_output.xgrammar_backend import XgrammarBackend

                self._backend = XgrammarBackend(self._tokenizer, self._vocab_size, self._stop_token_ids, max_threads=1)
            return self._backend

    @property
    def pool(self) -> CompilePool:
        """The compile worker processes, started on first use (GrammarCompileAbandoned once shut down)."""
        with self._lock:
            if self._is_shut_down:  # e.g. a warm-up thread that comes late must not start workers nobody kills
                raise GrammarCompileAbandoned("structured output compilation is shut down")
            if self._pool is None:
                backend = self.backend
                self._pool = CompilePool(backend.worker_setup, backend.worker_payload(), backend.load_compiled,
                                         num_workers=self._num_workers, max_result_bytes=self.cache_max_bytes)
            return self._pool

    def start_workers(self) -> None:
        """Start the compile workers now rather than at the first compile (a server warming up: each takes ~5 s of
        CPU to start). Returns once they are launched, not ready; a no-op once shut down."""
        try:
            self.pool
        except GrammarCompileAbandoned:
            pass

    def worker_pids(self) -> list[int]:
        """The process ids of the compile workers (none before they start)."""
        with self._lock:
            return [] if self._pool is None else [pid for pid in self._pool.worker_pids() if pid is not None]

    @property
    def max_wait_s(self) -> float:
        """The longest a compile can keep a request waiting (queued for a worker, then compiling)."""
        return CompilePool.max_wait_s(self.compile_timeout_s)

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the compiled grammars in the cache (their serialized sizes)."""
        return self._cache_bytes

    def prepare(self, params: StructuredOutputsParams, client_id: str | None = None) -> concurrent.futures.Future:
        """Start compiling the spec (or find it in the cache): the future of the compiled grammar, which fails with
        ValueError on a bad spec, a compile past ``compile_timeout_s`` or a crash of the compiler. Never blocks.
        GrammarQueueFull if ``client_id`` already waits for ``max_pending_per_client`` compiles."""
        return self._prepare_entry(params, client_id).job.compiled

    def new_requests(self, params: StructuredOutputsParams, num_sequences: int,
                     client_id: str | None = None) -> list[StructuredOutputRequest]:
        """One grammar object per sequence, sharing one compilation. Waits until the spec parsed, so that a bad spec
        raises ValueError here; the compile itself goes on in the background. A spec whose parse passes the deadline
        is not an error here: its requests end ("abort") with the timeout as their reason, as for a slow compile."""
        entry = self._prepare_entry(params, client_id)
        deadline = time.monotonic() + self.max_wait_s
        self._wait_parsed(entry.job, params.kind)
        return [StructuredOutputRequest(self.backend, entry.job.compiled, deadline) for _ in range(num_sequences)]

    def shutdown(self) -> None:
        """Abandon every compile at once (the workers are killed, not joined): pending futures fail with
        GrammarCompileAbandoned. Bounded: well under a second."""
        with self._lock:
            self._is_shut_down = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    # ---- the cache and the per-client limit -------------------------------------------------------------------

    def _prepare_entry(self, params: StructuredOutputsParams, client_id: str | None) -> _CacheEntry:
        key, spec = _key_and_spec(params)
        with self._lock:
            entry = self._lookup(key)
            if entry is not None and entry.job.compiled.done():
                return entry  # a cache hit never touches the pool nor the client's quota
            self._admit(client_id)
            if entry is None:
                entry = self._start(key, params.kind, spec, client_id)
            self._count_pending(client_id, entry.job.compiled)
            return entry

    def _lookup(self, key: tuple[str, str]) -> _CacheEntry | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.failed_at is not None and time.monotonic() - entry.failed_at > self.failure_ttl_s:
            self._remove(key)
            return None
        self._cache.move_to_end(key)
        return entry

    def _start(self, key: tuple[str, str], kind: str, spec: Any, client_id: str | None) -> _CacheEntry:
        if self._is_shut_down:
            raise GrammarCompileAbandoned("structured output compilation is shut down")
        entry = _CacheEntry(self.pool.submit(kind, spec, self.compile_timeout_s, client_id))
        self._cache[key] = entry
        entry.job.compiled.add_done_callback(lambda future: self._on_compiled(key, entry, future))
        return entry

    def _on_compiled(self, key: tuple[str, str], entry: _CacheEntry, future: concurrent.futures.Future) -> None:
        """Account a finished compile in the cache: its size if it compiled, its time if it failed; evict LRU."""
        with self._lock:
            if self._cache.get(key) is not entry:
                return  # evicted while pending
            if future.exception() is not None:
                entry.failed_at = time.monotonic()
                entry.num_bytes = len(key[1])  # failures count too, so that many distinct bad specs stay bounded
            else:
                entry.num_bytes = entry.job.num_bytes
            self._cache_bytes += entry.num_bytes
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used finished entries until the cache fits ``cache_max_bytes``."""
        for key in list(self._cache):
            if self._cache_bytes <= self.cache_max_bytes:
                return
            if self._cache[key].job.compiled.done():
                self._remove(key)

    def _remove(self, key: tuple[str, str]) -> None:
        entry = self._cache.pop(key)
        self._cache_bytes -= entry.num_bytes

    def _admit(self, client_id: str | None) -> None:
        if client_id is not None and self._pending_by_client.get(client_id, 0) >= self.max_pending_per_client:
            raise GrammarQueueFull(
                f"too many structured output grammars compiling for this client (at most "
                f"{self.max_pending_per_client} at once); retry when one has finished")

    def _count_pending(self, client_id: str | None, future: concurrent.futures.Future) -> None:
        if client_id is None:
            return
        self._pending_by_client[client_id] = self._pending_by_client.get(client_id, 0) + 1
        future.add_done_callback(lambda _: self._release(client_id))

    def _release(self, client_id: str) -> None:
        with self._lock:
            remaining = self._pending_by_client.get(client_id, 1) - 1
            if remaining > 0:
                self._pending_by_client[client_id] = remaining
            else:
                self._pending_by_client.pop(client_id, None)

    def _wait_parsed(self, job: CompileJob, kind: str) -> None:
        try:
            job.parsed.result(timeout=self.max_wait_s + _PARSE_WAIT_SLACK_S)
        except CompileTimeout:
            pass
        except concurrent.futures.TimeoutError:
            raise ValueError(timeout_message(kind, job.timeout_s)) from None


def _key_and_spec(params: StructuredOutputsParams) -> tuple[tuple[str, str], Any]:
    """The cache key and what is sent to a worker (text, so that sending never recurses); ValueError if the spec is
    nested too deeply to serialize."""
    try:
        value = getattr(params, params.kind)
        spec = json.dumps(value) if isinstance(value, dict) else value  # keep the schema's property order
        return (params.kind, params.spec_key), spec
    except RecursionError:
        raise ValueError(too_deep_message(params.kind)) from None
