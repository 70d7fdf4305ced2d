"""AsyncEngine: the engine loop runs continuously in its own thread behind an async add / stream / abort interface.

The loop thread owns the LLMEngine (scheduler, model runner, output processor); the asyncio side only validates
requests and exchanges messages with it: an inbox of commands in, per-request streams of RequestOutputs out. The
HTTP side therefore never blocks a step, and a step never blocks the event loop. The same message boundary is
where the engine core can later move into its own process.
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
from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.metrics import Metric
from pagedllm.engine.processing import ProcessedRequest, PromptInput
from pagedllm.engine.output_processor import merge_delta_outputs
from pagedllm.params import RequestOutput, RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks for a stop signal
# The engine thread and the event loop share the GIL. By default a thread waiting for it waits up to 5 ms before
# the holder is asked to let go: with the event loop busy writing hundreds of stream chunks, the engine would lose
# milliseconds per step (and the GPU idle with it). Asked after 0.5 ms instead.
_GIL_SWITCH_INTERVAL_S = 0.0005
_HEALTH_STALL_S = 120.0  # no step for this long while work is queued = the loop is stuck


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class _Stream:
    """Outputs of one request, handed from the loop thread to the asyncio task that waits for them.

    A reader that falls behind gets what piled up as one output: DELTA outputs are concatenated, the others
    (each complete) replaced by the latest. So a busy server sends fewer, larger stream chunks instead of
    falling further behind, as vLLM does.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, is_delta: bool) -> None:
        self._loop = loop
        self._is_delta = is_delta
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._held_error: BaseException | None = None  # met while merging: raised by the next get()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def put(self, item: RequestOutput | BaseException) -> None:  # called from the loop thread
        _call_soon(self._loop, self._queue.put_nowait, item)

    def put_nowait(self, item: RequestOutput | BaseException) -> None:  # called on the stream's event loop
        self._queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        if self._held_error is not None:
            raise self._held_error
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        while not self._queue.empty():
            later = self._queue.get_nowait()
            if isinstance(later, BaseException):
                self._held_error = later
                break
            item = merge_delta_outputs(item, later) if self._is_delta else later
        return item


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run ``callback(*args)`` on ``loop`` from another thread; dropped if the loop has closed (nobody is left to
    read it; the abort its reader sent is on its way)."""
    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the loop closed between the check and the call


def _deliver(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put_nowait(output)


@dataclass(slots=True)
class _Add:
    processed: ProcessedRequest
    stream: _Stream


@dataclass(slots=True)
class _Abort:
    request_id: str


class AsyncEngine:
    """Serves many concurrent requests from one continuously running engine loop."""

    def __init__(self, config: EngineConfig) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        self.engine = LLMEngine(config)
        self.config = config
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the loop thread
        self._stopping = threading.Event()
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run_loop, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncEngine:
        return cls(args.create_engine_config())

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.config.model_config

    @property
    def structured_output_manager(self):
        """The grammar compiler and cache, to compile a request's constraint ahead (ValueError without a tokenizer)."""
        return self.engine.input_processor.structured_output_manager

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence (the model's and the tokenizer's eos)."""
        return self.engine.input_processor.eos_token_ids

    # ---- the asyncio side ----------------------------------------------------------------------------------

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs. Raises ValueError at once on bad input; aborts the request if the
        consumer stops early (e.g. the client disconnected). ``priority`` (lower first) matters only under the
        "priority" scheduling policy."""
        if not self.is_running:
            raise EngineDeadError("The engine loop is not running")
        processed = self.engine.process_request(request_id, prompt, params, priority=priority)
        stream = _Stream(asyncio.get_running_loop(), params.output_kind == RequestOutputKind.DELTA)
        self._inbox.put(_Add(processed, stream))
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
        self._inbox.put(_Abort(request_id))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def is_healthy(self) -> bool:
        """Alive and making progress: a loop that has work but has not finished a step for long is stuck."""
        if not self.is_running:
            return False
        busy = self.engine.has_unfinished_requests() or not self._inbox.empty()
        return not busy or time.monotonic() - self._last_progress < _HEALTH_STALL_S

    def get_metrics(self) -> list[Metric]:
        return self.engine.get_metrics()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running end with an EngineDeadError in their streams."""
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    # ---- the loop thread -----------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_inbox(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as exc:  # a bug in the loop itself: fail everyone loudly rather than hang
            logger.exception("Engine loop crashed")
            self._fail_all(EngineDeadError(f"The engine loop crashed: {exc!r}"))
            raise
        self._fail_all(EngineDeadError("The engine is shutting down"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self._handle(message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, message: _Add | _Abort | None) -> None:
        if isinstance(message, _Add):
            request_id = message.processed.request_id
            try:
                self.engine.add_processed(message.processed)
            except Exception as exc:  # e.g. a duplicate id that raced past validation
                message.stream.put(exc)
                return
            self._streams[request_id] = message.stream
            self._last_progress = time.monotonic()
        elif isinstance(message, _Abort):
            if self._streams.pop(message.request_id, None) is not None:
                self.engine.abort_request(message.request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # The failing step cannot be pinned on one request: fail the requests in flight, keep serving.
            logger.exception("Engine step failed; aborting the %d requests in flight", len(self._streams))
            self._fail_all(RuntimeError(f"The engine step failed: {exc!r}"))
            return
        self._last_progress = time.monotonic()
        # One hand-over per event loop and step, not one per output: each wakes the loop through a pipe and
        # contends for the GIL, and a step of a full batch has hundreds of outputs.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.pop(output.request_id, None) if output.finished else self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver, items)

    def _fail_all(self, error: BaseException) -> None:
        request_ids = list(self._streams)
        for request_id in request_ids:
            self._streams.pop(request_id).put(error)
        if request_ids:
            self.engine.abort_request(request_ids)
