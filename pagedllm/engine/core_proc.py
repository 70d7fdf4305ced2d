"""The engine core's own process: the scheduler and the executor step here, away from the API server's GIL.

``run_engine_core`` is the child's main (started with the 'spawn' context by ``core_client.MultiprocessCoreClient``).
It connects its ZeroMQ sockets to the front ends': one PULL for ``contracts.FrontToCore`` messages (connected to
every front end's input), one PUSH per front end for ``contracts.CoreToFront`` (``core_routing.FrontEndRoutes``).
Start-up ends with the handshake, sent to whoever spawned the core (the only front end, or with several API server
processes the ``serve`` parent): ``CoreReady`` (what the front end needs), or ``CoreStartupFailed`` with the error
for the user, then exit. The loop: while there is work, take whatever input
is waiting without blocking, step, send the step's ``EngineCoreOutputs``; idle, block on input (sending a heartbeat
each ``HEARTBEAT_INTERVAL_S``, by which the front end knows the core is alive and not stuck).

The core owns the only grammar compile pool (its ``StructuredOutputManager``): the server's early check of a spec
arrives as ``PrepareGrammar`` and is answered when its compile finishes (``grammar_calls.PendingGrammarCalls``); a
finished compile wakes an idle loop through a pipe polled with the input socket. Serving (``warm_up_grammars``), the
compile workers start in the background while the model loads.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import zmq

from pagedllm.config import EngineConfig
from pagedllm.core.request import RequestStatus
from pagedllm.engine.contracts import (
    AbortRequests,
    AddRequests,
    CoreReady,
    CoreStartupFailed,
    EngineCoreOutput,
    EngineCoreOutputs,
    FrontToCore,
    GrammarPrepared,
    MessageCodec,
    PrepareGrammar,
    RemoveLoRA,
    ShutdownCore,
    UtilityCall,
    UtilityResult,
)
from pagedllm.engine.core_routing import FrontEndRoutes
from pagedllm.engine.grammar_calls import LazyStructuredOutputManager, PendingGrammarCalls
from pagedllm.logger import configure_logging
from pagedllm.platform import set_engine_cpu_threads, tune_gc_for_serving

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0  # longest silence of a live core (idle, or waiting on grammars); a step may take longer
_SEND_LINGER_MS = 5000  # at exit, how long queued messages (the start-up error, last outputs) may take to go out


def run_engine_core(config: EngineConfig, input_addresses: list[str], output_addresses: list[str], parent_pid: int,
                    warm_up_grammars: bool = False, handshake_address: str | None = None) -> None:
    """The child's main: build the core, shake hands, serve the front ends until told to stop or the parent is gone.
    ``output_addresses``: one per front end, by index. ``handshake_address``: where the handshake goes (None: the
    first output, the spawner being the only front end). ``warm_up_grammars``: start the grammar compile workers in
    the background now (serving): they start while the model loads, so that the first constrained request does not
    wait for them; readiness does not wait either."""
    # Ctrl-C reaches the whole process group: the parent decides (it drains, then tells this process to stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging("info", process_tag="engine core")
    if config.device == "cpu":  # after the logging set-up: the thread count it picks is logged
        set_engine_cpu_threads(config.cpu_threads, beside_api_server=True)
    context = zmq.Context()
    input_socket = _connect(context, zmq.PULL, *input_addresses)  # fair-queued over the front ends
    output_sockets = [_connect(context, zmq.PUSH, address) for address in output_addresses]
    handshake_socket = output_sockets[0] if handshake_address is None else _connect(context, zmq.PUSH,
                                                                                     handshake_address)
    sockets = {input_socket, handshake_socket, *output_sockets}
    codec = MessageCodec()
    grammars = LazyStructuredOutputManager(config)  # the only grammar compile pool of the server
    if warm_up_grammars:
        grammars.warm_up()
    core = _build_core(config, handshake_socket, codec, grammars.get)
    if core is None:
        grammars.shutdown()
        _close(context, _SEND_LINGER_MS, *sockets)  # the error must reach the parent
        sys.exit(1)
    tune_gc_for_serving()
    loop = _CoreLoop(core, input_socket, FrontEndRoutes(output_sockets, codec, HEARTBEAT_INTERVAL_S), codec, parent_pid)
    try:
        loop.run()
    finally:
        grammars.shutdown()  # kills the grammar compile workers at once
        core.shutdown()
        loop.close()
        _close(context, 0, *sockets)  # the parent reads no more: drop what is unsent


def _connect(context: zmq.Context, kind: int, *addresses: str) -> zmq.Socket:
    socket = context.socket(kind)
    for address in addresses:
        socket.connect(address)
    return socket


def _close(context: zmq.Context, linger_ms: int, *sockets: zmq.Socket) -> None:
    for socket in sockets:
        socket.close(linger=linger_ms)
    context.term()


def _build_core(config: EngineConfig, output_socket: zmq.Socket, codec: MessageCodec, structured_output_manager):
    """The EngineCore, announced with ``CoreReady``; or None after sending why it could not be built."""
    from pagedllm.engine.engine import EngineCore, describe_error

    try:
        core = EngineCore(config, structured_output_manager)
    except Exception as exc:
        logger.debug("Engine core start-up failed", exc_info=True)
        output_socket.send(codec.encode(CoreStartupFailed(describe_error(exc, max_chars=2000))))
        return None
    ready = CoreReady(core.num_blocks, config.scheduler_config.max_model_len, core.startup_report)
    output_socket.send(codec.encode(ready))
    return core


class _CoreLoop:
    """Inputs in, steps, outputs out: one thread, no locks."""

    def __init__(self, core, input_socket: zmq.Socket, routes: FrontEndRoutes, codec: MessageCodec,
                 parent_pid: int) -> None:
        self.core = core
        self.input_socket = input_socket
        self.routes = routes
        self.codec = codec
        self.parent_pid = parent_pid
        self.stopping = False
        self.pending: list[EngineCoreOutput] = []  # outputs made outside a step (failed adds)
        self.utility_results: list[UtilityResult] = []
        self.grammar_results: list[GrammarPrepared] = []
        # A finished grammar compile writes here (from the compile pool's thread) to wake an idle loop.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self.grammar_calls = PendingGrammarCalls(self._wake)
        self.poller = zmq.Poller()
        self.poller.register(self.input_socket, zmq.POLLIN)
        self.poller.register(self._wake_read, zmq.POLLIN)

    def close(self) -> None:
        """Close the wake pipe: after the core's shutdown, whose abandoned compiles still call ``_wake``."""
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)

    def run(self) -> None:
        while not self.stopping:
            busy = self.core.has_unfinished_requests()
            self._take_inputs(block=not busy)
            if self.stopping:
                return
            self.grammar_results += self.grammar_calls.take_answers()
            if self.core.has_unfinished_requests():
                self._step()
            elif self._has_answers():
                self._send(EngineCoreOutputs([], time.monotonic()))
            self._check_liveness()

    def _has_answers(self) -> bool:
        return bool(self.pending or self.utility_results or self.grammar_results)

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass  # the pipe is full (a wake is pending anyway) or closed (stopping)

    def _drain_wakes(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _take_inputs(self, block: bool) -> None:
        timeout_ms = int(HEARTBEAT_INTERVAL_S * 1000) if block else 0
        events = dict(self.poller.poll(timeout_ms))
        if self._wake_read in events:
            self._drain_wakes()
        if self.input_socket not in events:
            return
        while not self.stopping:
            try:
                data = self.input_socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(self.codec.decode_front_to_core(data))

    def _handle(self, message: FrontToCore) -> None:
        if isinstance(message, AddRequests):
            self._add(message)
        elif isinstance(message, AbortRequests):
            status = RequestStatus.FINISHED_STOPPED if message.stopped else RequestStatus.FINISHED_ABORTED
            self.core.abort_requests(message.request_ids, status)
            self.routes.forget(message.request_ids)
        elif isinstance(message, RemoveLoRA):
            self.core.remove_lora(message.lora_int_id)
        elif isinstance(message, UtilityCall):
            self.utility_results.append(self._call_utility(message))
        elif isinstance(message, PrepareGrammar):
            self.grammar_calls.start(message, lambda: self.core.structured_output_manager)
        elif isinstance(message, ShutdownCore):
            self.stopping = True

    def _add(self, message: AddRequests) -> None:
        """Queue a request's sequences; a request the core refuses (bad spec, id in use) fails alone."""
        from pagedllm.engine.engine import describe_error

        self.routes.added(message)
        try:
            self.core.add_requests(message.requests)
        except Exception as exc:
            error = describe_error(exc)
            self.pending += [EngineCoreOutput(r.request_id, [], finish_reason="abort", error=error)
                             for r in message.requests]

    def _call_utility(self, call: UtilityCall) -> UtilityResult:
        if call.method not in self.core.UTILITY_METHODS:
            return UtilityResult(call.call_id, error=f"no utility method {call.method!r}", front_end=call.front_end)
        try:
            return UtilityResult(call.call_id, getattr(self.core, call.method)(*call.args), front_end=call.front_end)
        except Exception as exc:
            return UtilityResult(call.call_id, error=f"{type(exc).__name__}: {exc}", front_end=call.front_end)

    def _step(self) -> None:
        try:
            outputs = self.core.step_outputs()
        except Exception:
            outputs = self._fail_everything()
        if outputs.outputs or self._has_answers() or self._heartbeat_due():
            self._send(outputs)

    def _fail_everything(self) -> EngineCoreOutputs:
        """A step raised outside the model (model failures are isolated inside the step): a bug of the engine's own
        bookkeeping, which no request can be blamed for. Fail those in flight, report the fault, keep serving."""
        request_ids = list(self.core.scheduler.requests)
        logger.exception("Engine step failed; aborting the %d requests in flight", len(request_ids))
        self.core.abort_requests(request_ids)
        failed = [EngineCoreOutput(request_id, [], finish_reason="abort",
                                   error="The engine failed while running this request") for request_id in request_ids]
        return EngineCoreOutputs(failed, time.monotonic(), self.core.scheduler.stats(),
                                 "an engine step raised outside the model")

    def _send(self, outputs: EngineCoreOutputs) -> None:
        if self.pending:
            outputs.outputs = self.pending + outputs.outputs
            self.pending = []
        if self.utility_results:
            outputs.utility_results, self.utility_results = self.utility_results, []
        if self.grammar_results:
            outputs.grammar_results, self.grammar_results = self.grammar_results, []
        self.routes.send(outputs)

    def _heartbeat_due(self) -> bool:
        return self.routes.heartbeat_due()

    def _check_liveness(self) -> None:
        """Heartbeat when silent for long; stop when the parent is gone (no one would read the outputs)."""
        if not self._heartbeat_due():
            return
        if os.getppid() != self.parent_pid:
            logger.error("The API server process (pid %d) is gone; the engine core exits", self.parent_pid)
            self.stopping = True
            return
        self._send(EngineCoreOutputs([], time.monotonic(), self.core.scheduler.stats(), self.core.engine_fault))
