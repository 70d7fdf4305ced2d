"""How the front end reaches the engine core: in this process (``InProcessCoreClient``) or in a child process
(``MultiprocessCoreClient``: spawned, ZeroMQ PUSH/PULL over ipc:// sockets in a private temporary directory,
``contracts`` messages encoded with msgspec).

With several API server processes (``serve --api-server-count N``) the ``serve`` parent spawns the core with
``MultiprocessCoreClient(..., num_front_ends=N)`` (it only starts, watches and stops it) and each API server talks
to it through an ``AttachedCoreClient``: its own socket pair in the parent's directory, its index stamped on what it
sends, the core's death seen through a pidfd (the core is not its child).

The multiprocess client is owned by one thread (the front end's loop): ZeroMQ sockets are not thread-safe. Another
thread wakes that loop with ``wake()`` (a pipe in the same poll as the output socket and the child's sentinel), so a
new request never waits for the next output, and the child's death is seen at once. A message from another thread
(the server's early grammar check) is queued with ``send_from_any_thread`` and sent by the owning thread.

The sockets' directory is named after this process (``pagedllm-core-<pid>-*``): a server killed with SIGKILL cannot
remove it, so each new client removes those of ours whose process is gone (``remove_stale_socket_dirs``).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import queue
import re
import select
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass

import zmq

from pagedllm.config import EngineConfig
from pagedllm.core.request import RequestStatus
from pagedllm.engine.contracts import (
    AbortRequests,
    AddRequests,
    CoreReady,
    CoreStartupFailed,
    EngineCoreOutputs,
    EngineCoreRequest,
    MessageCodec,
    RemoveLoRA,
    ShutdownCore,
    UtilityCall,
)

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (or is draining), or its core process died; no request can be served."""


class EngineStartupError(RuntimeError):
    """The engine core could not start; the message says why (as the core reported it)."""


class InProcessCoreClient:
    """The core in this process: calls go straight to it, and stepping it here yields its outputs."""

    def __init__(self, core) -> None:
        self.core = core

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self.core.add_requests(requests)

    def abort_requests(self, request_ids: list[str], stopped: bool = False) -> None:
        status = RequestStatus.FINISHED_STOPPED if stopped else RequestStatus.FINISHED_ABORTED
        self.core.abort_requests(request_ids, status)

    def remove_lora(self, lora_int_id: int) -> None:
        self.core.remove_lora(lora_int_id)

    def step(self) -> EngineCoreOutputs:
        return self.core.step_outputs()


_SOCKET_DIR_PREFIX = "pagedllm-core-"
_SOCKET_DIR_PATTERN = re.compile(rf"{_SOCKET_DIR_PREFIX}(\d+)-[^/]+")


def remove_stale_socket_dirs(parent: str | None = None) -> list[str]:
    """Remove the socket directories (``pagedllm-core-<pid>-*``, owned by this user) whose process is gone; return
    them. Directories of live processes, of other users and of any other name are left alone."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for name in os.listdir(parent):
        match = _SOCKET_DIR_PATTERN.fullmatch(name)
        path = os.path.join(parent, name)
        if match and _is_own_dir(path) and not _is_process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_own_dir(path: str) -> bool:
    try:
        info = os.lstat(path)  # lstat: a symlink is never followed, nor removed
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _is_process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's: a reused pid; keep the directory
    return True


_SEND_TIMEOUT_MS = 1000  # how long one send waits before checking that the core is still alive


@dataclass(frozen=True)
class FrontEndAddresses:
    """The sockets of one front end (an API server process) sharing a core that another process started: the
    front end binds them (``AttachedCoreClient``), the core connects to them."""

    input: str
    output: str


@dataclass(frozen=True)
class CoreAttachment:
    """What an API server process needs to attach to a core that the ``serve`` parent started (picklable)."""

    addresses: FrontEndAddresses
    front_end: int  # this API server's index: the core routes its outputs by it
    core_pid: int
    ready: CoreReady  # the core's handshake, which the parent received


class _CoreWatch:
    """A core process that is not our child (the ``serve`` parent started it): its exit is seen through a pidfd,
    which polls readable once the process has exited. No exit code: only its parent can reap it."""

    exitcode = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.sentinel = os.pidfd_open(pid)
        except ProcessLookupError:
            raise EngineDeadError(f"The engine core process (pid {pid}) is gone") from None

    def is_alive(self) -> bool:
        return not select.select([self.sentinel], [], [], 0)[0]

    def join(self, timeout: float | None = None) -> None:
        select.select([self.sentinel], [], [], timeout)

    def close(self) -> None:
        os.close(self.sentinel)


class _CoreChannel:
    """The sockets to a core process and the messages over them, shared by both clients: they open the sockets
    (``_open``), then watch the core's process (``_watch``: a child, or a ``_CoreWatch``)."""

    front_end = 0  # stamped on the messages whose answers must come back here (several front ends share a core)

    def _open(self, input_address: str, output_address: str) -> None:
        self._context = zmq.Context()
        self._codec = MessageCodec()
        self._input = self._bind(zmq.PUSH, input_address)
        self._output = self._bind(zmq.PULL, output_address)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._next_call_id = 0
        self._outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()  # encoded messages from other threads
        self._shutdown_lock = threading.Lock()  # the server may call shutdown from several threads at once
        self._is_shut_down = False

    def _watch(self, process: multiprocessing.process.BaseProcess | _CoreWatch) -> None:
        self.process = process
        self._poller = zmq.Poller()
        for source in (self._output, self._wake_read, self.process.sentinel):
            self._poller.register(source, zmq.POLLIN)

    def _bind(self, kind: int, address: str) -> zmq.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)  # a send to a dead core must not block forever
        socket.bind(address)
        return socket

    # ---- requests in -------------------------------------------------------------------------------------------

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._send(self._codec.encode(AddRequests(requests, self.front_end)))

    def abort_requests(self, request_ids: list[str], stopped: bool = False) -> None:
        self._send(self._codec.encode(AbortRequests(request_ids, stopped)))

    def remove_lora(self, lora_int_id: int) -> None:
        self._send(self._codec.encode(RemoveLoRA(lora_int_id)))

    def _send(self, data: bytes) -> None:
        """Send to the core, waiting while it is alive (a busy core takes its input every step); EngineDeadError
        once it is gone (a socket with no reader would wait forever)."""
        while True:
            try:
                self._input.send(data, copy=False)
                return
            except zmq.Again:
                if not self.process.is_alive():
                    raise EngineDeadError(self.death_reason()) from None

    def call_utility(self, method: str, *args) -> int:
        """Send a utility call; its ``UtilityResult`` (same call id) comes back in the outputs."""
        self._next_call_id += 1
        self._send(self._codec.encode(UtilityCall(self._next_call_id, method, list(args), self.front_end)))
        return self._next_call_id

    def send_from_any_thread(self, data: bytes) -> None:
        """Queue an encoded message for the core; the owning thread sends it (woken now). Safe from any thread."""
        self._outbox.put(data)
        self.wake()

    def _send_outbox(self) -> None:
        while True:
            try:
                data = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send(data)

    # ---- outputs out -------------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Make a ``get_outputs`` waiting in another thread return now. Safe from any thread."""
        try:
            os.write(self._wake_write, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake is pending anyway) or closed (shut down)

    def get_outputs(self, timeout_s: float) -> list[EngineCoreOutputs]:
        """Whatever outputs have arrived, waiting up to ``timeout_s`` for the first (or a ``wake``). Raises
        EngineDeadError if the child has died."""
        self._send_outbox()
        events = dict(self._poller.poll(int(timeout_s * 1000)))
        if self._wake_read in events:
            self._drain_wake_pipe()
            self._send_outbox()
        messages = self._receive_all() if self._output in events else []
        if self.process.sentinel in events:
            raise EngineDeadError(self.death_reason())
        return messages

    def _receive_all(self) -> list[EngineCoreOutputs]:
        messages = []
        while True:
            try:
                data = self._output.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return messages
            messages.append(self._codec.decode_core_to_front(data.buffer))

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def death_reason(self) -> str:
        self.process.join(0.5)
        code = self.process.exitcode
        return "The engine core process died unexpectedly" + ("" if code is None else f" (exit code {code})")

    @property
    def is_alive(self) -> bool:
        return self.process.is_alive()

    def _close_channel(self) -> None:
        for socket in (self._input, self._output):
            socket.close()
        self._context.term()
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)


class MultiprocessCoreClient(_CoreChannel):
    """The core in a spawned child. Construction returns once the child is ready (``self.ready``), or raises
    ``EngineStartupError`` with the child's reason."""

    def __init__(self, config: EngineConfig, warm_up_grammars: bool = False, num_front_ends: int = 0) -> None:
        """``warm_up_grammars``: the core starts its grammar compile workers in the background once ready.
        ``num_front_ends`` > 0: the core serves that many other front ends (``AttachedCoreClient``s, at the
        addresses ``self.front_ends``); this client only starts, watches and stops it (the handshake, no outputs)."""
        remove_stale_socket_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{_SOCKET_DIR_PREFIX}{os.getpid()}-")
        self._own = FrontEndAddresses(f"ipc://{self._dir}/input", f"ipc://{self._dir}/output")
        self._open(self._own.input, self._own.output)
        self.front_ends = [FrontEndAddresses(f"ipc://{self._dir}/input-{index}", f"ipc://{self._dir}/output-{index}")
                           for index in range(num_front_ends)]
        self._watch(self._spawn(config, warm_up_grammars))
        # Reaped at interpreter exit even if nobody called shutdown() (else multiprocessing's own exit hook would
        # wait forever for a child that waits for orders).
        atexit.register(self.shutdown, 2.0)
        try:
            self.ready: CoreReady = self._handshake()
        except BaseException:
            self.shutdown(timeout=5.0)
            raise

    def attachments(self) -> list[CoreAttachment]:
        """What each front end needs to attach to this core (``num_front_ends`` of them)."""
        return [CoreAttachment(addresses, index, self.process.pid, self.ready)
                for index, addresses in enumerate(self.front_ends)]

    def _spawn(self, config: EngineConfig, warm_up_grammars: bool) -> multiprocessing.process.BaseProcess:
        from pagedllm.engine.core_proc import run_engine_core

        if self.front_ends:  # the core takes input from everyone and sends outputs to the front ends only
            inputs = [self._own.input, *(front_end.input for front_end in self.front_ends)]
            outputs, handshake = [front_end.output for front_end in self.front_ends], self._own.output
        else:
            inputs, outputs, handshake = [self._own.input], [self._own.output], None
        # Not a daemon: the core starts processes of its own (grammar compile workers). Reaped by shutdown();
        # if this process dies first, the core notices its new parent and exits.
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, name="pagedllm-engine-core",
            args=(config, inputs, outputs, os.getpid(), warm_up_grammars, handshake),
        )
        process.start()
        return process

    def _handshake(self) -> CoreReady:
        """Wait for ``CoreReady`` (loading may take minutes: no timeout, but a dead child is seen at once)."""
        while True:
            events = dict(self._poller.poll(1000))
            if self._output in events:
                message = self._codec.decode_core_to_front(self._output.recv())
                if isinstance(message, CoreReady):
                    return message
                if isinstance(message, CoreStartupFailed):
                    raise EngineStartupError(f"The engine core failed to start: {message.error}")
            if self.process.sentinel in events:
                self.process.join(1.0)
                raise EngineStartupError(f"The engine core process exited during start-up (exit code "
                                         f"{self.process.exitcode}); its log above says why")

    # ---- the end -----------------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """Tell the child to stop, reap it (terminate, then kill, if it does not stop within ``timeout``), close the
        sockets and remove their directory. Idempotent."""
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
            atexit.unregister(self.shutdown)
            self._stop_child(timeout)
            self._release_resources()

    def _stop_child(self, timeout: float) -> None:
        if self.process.is_alive():
            try:
                # Never blocks: a child that is exiting (its socket already closed) would never take the message.
                self._input.send(self._codec.encode(ShutdownCore()), zmq.NOBLOCK)
            except zmq.Again:
                logger.debug("The engine core process takes no more messages; reaping it")
            self._reap(timeout)
        self.process.join(0.1)

    def _release_resources(self) -> None:
        self._close_channel()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.process.join(timeout)
        for stop in (self.process.terminate, self.process.kill):
            if not self.process.is_alive():
                return
            logger.warning("The engine core process did not stop within %.1f s; %s", timeout, stop.__name__)
            stop()
            self.process.join(max(1.0, deadline - time.monotonic()))


class AttachedCoreClient(_CoreChannel):
    """One of several front ends (API server processes) of a core that another process started and stops (the
    ``serve`` parent: ``MultiprocessCoreClient(..., num_front_ends=N)``). Binds the sockets the core connects to;
    the core's death is seen at once through a pidfd."""

    def __init__(self, attachment: CoreAttachment) -> None:
        self.front_end = attachment.front_end
        self.ready = attachment.ready
        self._open(attachment.addresses.input, attachment.addresses.output)
        self._watch(_CoreWatch(attachment.core_pid))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Close this front end's sockets (the parent stops the core). Idempotent."""
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
            self._close_channel()
            self.process.close()
