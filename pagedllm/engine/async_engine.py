"""AsyncEngine: the engine loop runs continuously in its own thread behind an async add / stream / abort interface.

The loop thread owns the LLMEngine (scheduler, model runner, output processor); the asyncio side only validates
requests and exchanges messages with it: an inbox of commands in, per-request streams of RequestOutputs out. The
HTTP side therefore never blocks a step, and a step never blocks the event loop. The same message boundary is
where the engine core can later move into its own process.

With ``core_process=True`` (``pagedllm serve``'s default) the engine core (scheduler, model) runs in its own process
(``core_proc.py``) and the loop thread here keeps tokenizing, detokenizing, stop strings and streams: it sends
requests to the core and turns the core's outputs into stream outputs (``frontend.MultiprocessLLMEngine``). If the
core process dies, every stream ends with EngineDeadError at once, health turns bad for good, and the callbacks of
``on_core_death`` run (the server exits).

Health is answered from flags the loop thread sets (no lock, no waiting on the loop): see ``health_reason``. A
request the engine fails (the culprit of a failing step, see ``core/quarantine.py``) ends its stream with a
``RequestFailedError`` about that request only; the other streams go on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pagedllm.config import EngineArgs, EngineConfig
from pagedllm.engine.core_client import CoreAttachment, EngineDeadError, EngineStartupError  # noqa: F401
from pagedllm.engine.deadlines import QueueTimeoutError, RequestDeadlines, RequestTimeoutError  # noqa: F401
from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.metrics import Metric
from pagedllm.engine.processing import ProcessedRequest, PromptInput
from pagedllm.engine.output_processor import merge_delta_outputs
from pagedllm.lora.request import LoRARequest
from pagedllm.params import RequestOutput, RequestOutputKind, SamplingParams
from pagedllm.platform import set_engine_cpu_threads

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks for a stop signal
# The engine thread and the event loop share the GIL. By default a thread waiting for it waits up to 5 ms before
# the holder is asked to let go: with the event loop busy writing hundreds of stream chunks, the engine would lose
# milliseconds per step (and the GPU idle with it). Asked after 0.5 ms instead.
_GIL_SWITCH_INTERVAL_S = 0.0005
DEFAULT_HEALTH_STALL_TIMEOUT_S = 60.0  # no loop iteration (a step, or an idle wait) for this long = stuck


class RequestFailedError(RuntimeError):
    """The engine could not run this request (not the client's fault); the message concerns this request only."""


class _Stream:
    """Outputs of one request, handed from the loop thread to the asyncio task that waits for them.

    A reader that falls behind gets what piled up as one output: DELTA outputs are concatenated, the others
    (each complete) replaced by the latest. So a busy server sends fewer, larger stream chunks instead of
    falling further behind, as vLLM does.

    A list and one future rather than an ``asyncio.Queue``: every stream takes an output at every step, and the
    reader takes everything at once anyway.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, is_delta: bool) -> None:
        self._loop = loop
        self._is_delta = is_delta
        self._items: list[RequestOutput | BaseException] = []
        self._waiter: asyncio.Future[None] | None = None  # the reader's, while it waits for an item
        self._held_error: BaseException | None = None  # met while merging: raised by the next get()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def put(self, item: RequestOutput | BaseException) -> None:  # called from the loop thread
        _call_soon(self._loop, self.put_nowait, item)

    def put_nowait(self, item: RequestOutput | BaseException) -> None:  # called on the stream's event loop
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        if self._held_error is not None:
            raise self._held_error
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        items, self._items = self._items, []
        return self._merged(items)

    def _merged(self, items: list[RequestOutput | BaseException]) -> RequestOutput:
        """The items as one output; an error after the first item is held for the next get()."""
        if isinstance(items[0], BaseException):
            self._items[:0] = items[1:]  # left for the next get(), as a queue would
            raise items[0]
        outputs = []
        for item in items:
            if isinstance(item, BaseException):
                self._held_error = item
                break
            outputs.append(item)
        return merge_delta_outputs(*outputs) if self._is_delta else outputs[-1]


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run ``callback(*args)`` on ``loop`` from another thread; dropped if the loop has closed (nobody is left to
    read it; the abort its reader sent is on its way)."""
    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the loop closed between the check and the call


def _deliver(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, output in items:
        stream.put_nowait(output)


@dataclass(slots=True)
class _Add:
    processed: ProcessedRequest
    stream: _Stream
    timeout_s: float | None = None  # the request's own deadline, from when the loop takes it


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _RemoveLoRA:
    lora_int_id: int


@dataclass(slots=True)
class _TimedOut:
    """A request the front end timed out itself (a beam search spans many engine requests): counted here, where
    the engine counts the requests it drops at their own deadline."""


class AsyncEngine:
    """Serves many concurrent requests from one continuously running engine loop."""

    def __init__(self, config: EngineConfig, health_stall_timeout_s: float = DEFAULT_HEALTH_STALL_TIMEOUT_S,
                 core_process: bool = False, warm_up_grammars: bool = False,
                 max_queue_delay_s: float | None = None, attachment: CoreAttachment | None = None) -> None:
        """``health_stall_timeout_s``: how long the loop may go without finishing a step (or an idle wait; with a
        core process: without hearing from it) before the engine reports itself unhealthy. ``core_process``: run
        the engine core in its own process (raises EngineStartupError, with the core's reason, if it cannot start).
        ``warm_up_grammars`` (a server): start the grammar compile workers in the background now, so that the first
        constrained request does not wait for them (they take ~5 s of CPU each; readiness does not wait).
        ``max_queue_delay_s``: a request still without its first token this long after it was added is aborted and
        its stream ends with QueueTimeoutError (see ``deadlines.py``). ``attachment``: one of several API server
        processes, attached to a core the ``serve`` parent started (implies ``core_process``)."""
        if not health_stall_timeout_s > 0:
            raise ValueError(f"health_stall_timeout_s must be positive, got {health_stall_timeout_s}")
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        self.core_process = core_process or attachment is not None
        self.engine = _make_engine(config, self.core_process, warm_up_grammars, attachment)
        self._dead_reason: str | None = None  # the core process died: why (health stays bad)
        self._death_callbacks: list = []
        self.config = self.engine.config  # with the end-of-sequence ids resolved
        self.health_stall_timeout_s = health_stall_timeout_s
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the loop thread
        self._deadlines = RequestDeadlines(max_queue_delay_s)  # owned by the loop thread
        self._stopping = threading.Event()
        self._draining = False
        # Set by the loop thread, read by anyone without a lock: the health flags.
        self._last_progress = time.monotonic()
        self._fault: str | None = None  # steps keep failing; cleared by the next successful step
        self._thread = threading.Thread(target=self._run_loop, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(
        cls, args: EngineArgs, health_stall_timeout_s: float = DEFAULT_HEALTH_STALL_TIMEOUT_S,
        core_process: bool = False, warm_up_grammars: bool = False, max_queue_delay_s: float | None = None,
    ) -> AsyncEngine:
        return cls(args.create_engine_config(), health_stall_timeout_s, core_process, warm_up_grammars,
                   max_queue_delay_s)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.config.model_config

    @property
    def structured_output_manager(self):
        """What compiles a request's constraint ahead (ValueError without a tokenizer): in one process the manager
        the engine's grammars come from; with a core process, a stand-in that asks the core's (``prepare``,
        ``compile_timeout_s``, ``max_wait_s``), so that each spec compiles once, in the core's compile pool."""
        return self.engine.structured_output_manager

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence (the model's and the tokenizer's eos)."""
        return self.engine.input_processor.eos_token_ids

    # ---- the asyncio side ----------------------------------------------------------------------------------

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, priority: int = 0,
        lora_request: LoRARequest | None = None, timeout_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs. Raises ValueError at once on bad input; aborts the request if the
        consumer stops early (e.g. the client disconnected). ``priority`` (lower first) matters only under the
        "priority" scheduling policy. The stream raises RequestFailedError if the engine fails this request,
        EngineDeadError if the engine stops (or is draining, for a new request), QueueTimeoutError if it waited
        past the queue delay for its first token and RequestTimeoutError past ``timeout_s`` (both aborted)."""
        if not self.is_running:
            raise EngineDeadError(self._dead_reason or "The engine loop is not running")
        if self._draining:
            raise EngineDeadError("The engine is draining: it takes no new requests")
        processed = self.engine.process_request(request_id, prompt, params, priority=priority, lora_request=lora_request)
        stream = _Stream(asyncio.get_running_loop(), params.output_kind == RequestOutputKind.DELTA)
        self._post(_Add(processed, stream, timeout_s))
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at the next step boundary."""
        self._post(_Abort(request_id))

    def remove_lora(self, lora_int_id: int) -> None:
        """An adapter was unloaded (no new request uses it): the engine drops its weights once the requests running
        with it have finished. Safe from any thread."""
        self._post(_RemoveLoRA(lora_int_id))

    def record_request_timeout(self) -> None:
        """Count a request that ran past its ``timeout`` under the front end's own timer (its engine requests were
        aborted by their callers) in ``request_rejected_total{reason="request_timeout"}``."""
        self._post(_TimedOut())

    def _post(self, message: _Add | _Abort | _RemoveLoRA | _TimedOut | None) -> None:
        """Hand a message to the loop thread (waking it if it waits for the core's outputs)."""
        self._inbox.put(message)
        if self.core_process:
            self.engine.wake()

    def on_core_death(self, callback) -> None:
        """Call ``callback()`` (from the loop thread) if the engine core process dies."""
        self._death_callbacks.append(callback)

    @property
    def core_died(self) -> bool:
        return self._dead_reason is not None

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def is_healthy(self) -> bool:
        """Alive, making progress, and not failing steps with no request to blame (``health_reason`` is None)."""
        return self.health_reason() is None

    def health_reason(self) -> str | None:
        """Why the engine is unhealthy, in a few words (for a 503 body), or None. Reads flags only: answers at once
        even while a step runs or hangs."""
        if self._dead_reason is not None:
            return self._dead_reason
        if not self.is_running:
            return "the engine loop is not running"
        stalled_s = time.monotonic() - self._last_progress
        if stalled_s > self.health_stall_timeout_s:
            return f"the engine loop has made no progress for {stalled_s:.0f} s"
        fault = self._fault
        if fault is not None:
            return f"engine fault: {fault}"
        return None

    def is_ready(self) -> bool:
        """Started and taking new requests: False once draining or shutdown has begun."""
        return self.is_running and not self._draining

    def begin_draining(self) -> None:
        """Take no new requests (``generate`` raises EngineDeadError, ``is_ready`` turns False); those in flight go
        on to their end."""
        self._draining = True

    @property
    def num_requests_in_flight(self) -> int:
        """Requests added and not yet finished (those in the inbox too): what an unload waits for. Read without a
        lock: an estimate that is exact once it reaches 0 while draining (no new request can come)."""
        return len(self._streams) + self._inbox.qsize()

    def get_metrics(self) -> list[Metric]:
        return [*self.engine.get_metrics(), *self._deadlines.metrics()]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop within about ``timeout`` seconds; requests still running end with an EngineDeadError in their
        streams (at once if the loop is stuck in a step past the timeout: it is a daemon thread, left behind)."""
        self._draining = True
        self._stopping.set()
        self._post(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("The engine loop did not stop within %.1f s; failing its requests without it", timeout)
            self._fail_streams(EngineDeadError("The engine is shutting down"))
            self._fail_inbox(EngineDeadError("The engine is shutting down"))
        # Kills the grammar compile workers (with a core process: the core does, and is reaped). In one process only
        # after the loop stopped, or gave up on it: a step in flight may be waiting on a compile.
        if self.core_process:
            self.engine.shutdown(timeout)
        else:
            self.engine.shutdown()

    # ---- the loop thread -----------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if self.core_process:
                    # Always wait on the core: its heartbeats, outputs and death (the inbox wakes the wait).
                    self._drain_inbox(block=False)
                    self._step()
                    self._expire_deadlines()
                    continue
                self._drain_inbox(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._step()
                    self._expire_deadlines()
                else:
                    self._last_progress = time.monotonic()  # idle, and answering its inbox
        except BaseException:  # a bug in the loop itself: fail everyone loudly rather than hang
            logger.exception("Engine loop crashed")
            self._fail_all(EngineDeadError("The engine loop crashed"))
            self._fail_inbox(EngineDeadError("The engine loop crashed"))
            raise
        self._fail_all(EngineDeadError("The engine is shutting down"))
        self._fail_inbox(EngineDeadError("The engine is shutting down"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self._handle(message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, message: _Add | _Abort | _RemoveLoRA | _TimedOut | None) -> None:
        if isinstance(message, _Add):
            request_id = message.processed.request_id
            try:
                self.engine.add_processed(message.processed)
            except Exception as exc:  # e.g. a duplicate id that raced past validation
                message.stream.put(exc)
                return
            self._streams[request_id] = message.stream
            self._last_progress = time.monotonic()
            self._deadlines.add(request_id, self._last_progress, message.timeout_s)
        elif isinstance(message, _Abort):
            self._deadlines.discard(message.request_id)
            if self._streams.pop(message.request_id, None) is not None:
                self.engine.abort_request(message.request_id)
        elif isinstance(message, _RemoveLoRA):
            try:
                self.engine.remove_lora(message.lora_int_id)
            except Exception:  # a core gone is noticed by the next step; the adapter only stays cached
                logger.warning("Could not remove LoRA adapter %d", message.lora_int_id, exc_info=True)
        elif isinstance(message, _TimedOut):
            self._deadlines.record_expired("request_timeout")

    def _expire_deadlines(self) -> None:
        """Abort the requests past a deadline (freeing their KV blocks now) and end their streams with why."""
        expired = self._deadlines.expired(time.monotonic(), self.engine.output_processor.has_first_token)
        for request_id, error in expired:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self.engine.abort_request(request_id)
                stream.put(error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step(_IDLE_WAIT_S) if self.core_process else self.engine.step()
        except EngineDeadError as exc:
            self._on_core_death(str(exc))
            return
        except Exception:
            # Model failures are isolated inside the step (the culprit fails alone); reaching here is a bug of the
            # engine's own bookkeeping, which no request can be blamed for: fail those in flight, keep serving.
            logger.exception("Engine step failed; aborting the %d requests in flight: %s", len(self._streams),
                             list(self._streams))
            self._fault = "an engine step raised outside the model"
            self._fail_all(RequestFailedError("The engine failed while running this request"))
            return
        self._last_progress = self.engine.last_heard_from_core if self.core_process else time.monotonic()
        self._fault = self.engine.engine_fault
        # One hand-over per event loop and step, not one per output: each wakes the loop through a pipe and
        # contends for the GIL, and a step of a full batch has hundreds of outputs.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
        for output in outputs:
            if output.finished:
                self._deadlines.discard(output.request_id)
            stream = self._streams.pop(output.request_id, None) if output.finished else self._streams.get(output.request_id)
            if stream is not None:
                item = output if output.error is None else RequestFailedError(output.error)
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver, items)

    def _on_core_death(self, reason: str) -> None:
        """The core process is gone: every stream ends now with the reason; the loop stops; the callbacks run."""
        logger.error("%s; failing the %d requests in flight", reason, len(self._streams))
        self._dead_reason = reason
        self._draining = True
        self._stopping.set()
        error = EngineDeadError(reason)
        self._fail_streams(error)
        self._fail_inbox(error)
        for callback in self._death_callbacks:
            callback()

    def _fail_all(self, error: BaseException) -> None:
        """End every stream of a request in flight with ``error`` and abort the requests."""
        request_ids = self._fail_streams(error)
        if request_ids and self._dead_reason is None:
            self.engine.abort_request(request_ids)

    def _fail_streams(self, error: BaseException) -> list[str]:
        """Put ``error`` in the stream of every request in flight; return their ids. Safe from any thread (streams
        are handed over through their event loops)."""
        request_ids = list(self._streams)
        for request_id in request_ids:
            self._deadlines.discard(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)
        return request_ids

    def _fail_inbox(self, error: BaseException) -> None:
        """At shutdown: end the streams of requests still in the inbox, which no loop will take any more."""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Add):
                message.stream.put(error)


def _make_engine(config: EngineConfig, core_process: bool, warm_up_grammars: bool,
                 attachment: CoreAttachment | None = None):
    if core_process:
        from pagedllm.engine.frontend import MultiprocessLLMEngine

        return MultiprocessLLMEngine(config, warm_up_grammars, attachment)
    if config.device == "cpu":  # the engine thread shares this process with the API server: leave it a core
        set_engine_cpu_threads(config.cpu_threads, beside_api_server=True)
    engine = LLMEngine(config)
    if warm_up_grammars:
        engine.warm_up_structured_outputs()
    return engine
