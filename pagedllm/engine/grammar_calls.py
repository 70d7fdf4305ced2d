"""The server's early grammar check when the engine core runs in its own process: one compile pool, the core's.

The front end holds a ``CoreGrammarPreparer``, which has the surface of ``StructuredOutputManager`` that the server's
check uses (``prepare``, ``compile_timeout_s``, ``max_wait_s``) and sends each spec to the core as a
``PrepareGrammar``. The core's ``PendingGrammarCalls`` starts the compile in its manager and answers with a
``GrammarPrepared`` when the compile has finished, without waiting for it (a done-callback wakes the core's loop).
The answer carries the kind of error, so the front end raises the exception type the manager raised: the server's
400 / 429 / 503 stay what they are in one process. The compiled grammar stays in the core's cache, where the
request that follows finds it: each spec compiles once, and only the core starts compile workers.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import msgspec

from pagedllm.config import EngineConfig
from pagedllm.engine.contracts import GrammarPrepared, PrepareGrammar
from pagedllm.params import StructuredOutputsParams
from pagedllm.structured_output.compile_pool import CompilePool, GrammarCompileAbandoned
from pagedllm.structured_output.manager import GrammarQueueFull

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 1000  # an error message goes back to one client: bounded, like the manager's own messages


# ---- errors across the process boundary --------------------------------------------------------------------------


def grammar_answer(call_id: int, exc: BaseException | None, front_end: int = 0) -> GrammarPrepared:
    """The ``GrammarPrepared`` for a compile that succeeded (``exc`` None) or failed with ``exc``."""
    if exc is None:
        return GrammarPrepared(call_id, front_end=front_end)
    return GrammarPrepared(call_id, _error_kind(exc), str(exc)[:_MAX_ERROR_CHARS], front_end)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, GrammarQueueFull):
        return "queue_full"
    if isinstance(exc, GrammarCompileAbandoned):
        return "abandoned"
    if isinstance(exc, ValueError):  # a bad spec, a compile past its deadline (CompileTimeout), no tokenizer
        return "invalid"
    logger.error("Grammar compile failed unexpectedly: %s: %s", type(exc).__name__, exc)
    return "internal"


def exception_for(answer: GrammarPrepared) -> BaseException:
    """The exception the core's manager raised, rebuilt from its answer."""
    message = answer.error or "structured_outputs: the grammar could not be compiled"
    kinds: dict[str, type[BaseException]] = {
        "invalid": ValueError, "queue_full": GrammarQueueFull, "abandoned": GrammarCompileAbandoned,
    }
    return kinds.get(answer.error_kind or "", RuntimeError)(message)


# ---- the core's side ---------------------------------------------------------------------------------------------


class PendingGrammarCalls:
    """The core's ``PrepareGrammar`` calls whose compiles are in flight. Owned by the core's loop thread; the
    compile pool's thread only calls ``wake`` (so that an idle loop answers at once)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        # (front end, call id) -> the compile: each front end (API server process) numbers its calls itself.
        self._pending: dict[tuple[int, int], concurrent.futures.Future] = {}
        self._answered: list[GrammarPrepared] = []  # failed before a compile started (queue full, no tokenizer)

    def start(self, call: PrepareGrammar, manager_provider: Callable[[], Any]) -> None:
        """Start the compile (or find it cached); never waits for it."""
        try:
            future = manager_provider().prepare(call.spec, call.client_id)
        except Exception as exc:
            self._answered.append(grammar_answer(call.call_id, exc, call.front_end))
            return
        self._pending[call.front_end, call.call_id] = future
        future.add_done_callback(lambda _: self._wake())

    def take_answers(self) -> list[GrammarPrepared]:
        """The answers of the calls finished since the last take."""
        answers, self._answered = self._answered, []
        for key in [key for key, future in self._pending.items() if future.done()]:
            front_end, call_id = key
            answers.append(grammar_answer(call_id, self._pending.pop(key).exception(), front_end))
        return answers

    @property
    def num_pending(self) -> int:
        return len(self._pending)


class LazyStructuredOutputManager:
    """The engine core process's grammar manager: made on first use or by ``warm_up`` (thread-safe), then shut
    down with the process."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._manager = None

    def get(self):
        """The manager (ValueError without a tokenizer)."""
        from pagedllm.engine.engine import make_structured_output_manager

        with self._lock:
            if self._manager is None:
                self._manager = make_structured_output_manager(self._config)
            return self._manager

    def warm_up(self) -> None:
        """Start the compile workers in a background thread; nothing to do without a tokenizer."""
        from pagedllm.engine.engine import start_grammar_warm_up

        if not self._config.skip_tokenizer_init:
            start_grammar_warm_up(self.get)

    def shutdown(self) -> None:
        with self._lock:
            manager = self._manager
        if manager is not None:
            manager.shutdown()


# ---- the front end's side ----------------------------------------------------------------------------------------


class CoreGrammarPreparer:
    """Stands in for the core's ``StructuredOutputManager`` in the front end (what the server's early check uses):
    ``prepare`` asks the core and returns a future that resolves when the core answers. Thread-safe: ``prepare``
    runs on the server's event loop, ``resolve`` and ``abandon_all`` on the engine loop thread."""

    def __init__(self, config: EngineConfig, send: Callable[[bytes], None], front_end: int = 0) -> None:
        """``send``: hands an encoded message to the core, from any thread. ``front_end``: this API server
        process's index, when several share the core (its answers come back here)."""
        self.compile_timeout_s = config.structured_outputs_config.compile_timeout_s
        self._send = send
        self._front_end = front_end
        self._lock = threading.Lock()
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count(1)
        self._closed_reason: str | None = None

    @property
    def max_wait_s(self) -> float:
        """As the core's manager: the longest a compile can keep a request waiting (queued, then compiling)."""
        return CompilePool.max_wait_s(self.compile_timeout_s)

    def prepare(self, spec: StructuredOutputsParams, client_id: str | None = None) -> concurrent.futures.Future:
        """Ask the core to compile ``spec``: the future resolves (to None) once it compiled, or fails with the
        exception the core's manager raised. Never blocks."""
        call_id = next(self._call_ids)
        data = _encode(PrepareGrammar(call_id, spec, client_id, self._front_end), spec.kind)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed_reason is not None:
                raise GrammarCompileAbandoned(self._closed_reason)
            self._futures[call_id] = future
        self._send(data)
        return future

    def resolve(self, answers: list[GrammarPrepared]) -> None:
        """Settle the futures of the core's answers."""
        for answer in answers:
            with self._lock:
                future = self._futures.pop(answer.call_id, None)
            if future is None:
                continue
            if answer.error_kind is None:
                future.set_result(None)
            else:
                future.set_exception(exception_for(answer))

    def abandon_all(self, reason: str) -> None:
        """The core is gone or stopping: fail every pending call (a 503) and any later one."""
        with self._lock:
            self._closed_reason = reason
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            future.set_exception(GrammarCompileAbandoned(reason))

    @property
    def num_pending(self) -> int:
        return len(self._futures)

    def shutdown(self) -> None:
        """As the manager's: pending and later calls fail with GrammarCompileAbandoned (the core kills the workers)."""
        self.abandon_all("structured output compilation was abandoned: the server is stopping")


def _encode(message: PrepareGrammar, kind: str) -> bytes:
    """The message's bytes (module-level msgspec encoding: safe from any thread); ValueError if it cannot be sent."""
    try:
        return msgspec.msgpack.encode(message)
    except (TypeError, OverflowError, RecursionError, msgspec.EncodeError):
        raise ValueError(f"structured_outputs.{kind} cannot be sent to the engine core") from None
