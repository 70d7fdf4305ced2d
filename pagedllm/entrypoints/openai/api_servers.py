"""``pagedllm serve --api-server-count N``: N API server processes in front of one engine core process.

One API server process (HTTP, tokenization, detokenization, streaming) tops out at one CPU core; with a small model
on a fast GPU that is the limit. Here the parent (the ``serve`` process) binds the listening socket once, starts the
engine core (its handshake comes here, so a start-up error is one message) and then N API server processes. Each
attaches to the core (``core_client.AttachedCoreClient``) and serves HTTP on the socket it inherits with the usual
app (``server.build_app`` / ``serve_app``). The parent binds one socket per API server on the same port
(SO_REUSEPORT), so that the kernel spreads new connections evenly over them: on one shared socket, the process that
wakes first accepts a whole burst (an event loop accepts up to its backlog per wake-up) and the others idle. ``/metrics`` of any
of them reports the whole server (``shared_metrics.py``).

The parent then only watches its children:

- SIGTERM / SIGINT: every API server gets one SIGTERM and drains as a single server does; then the core is stopped
  and reaped; exit 0. The API servers run in their own process group, so that a terminal's Ctrl-C reaches the
  parent only (a second signal would make uvicorn skip draining), and get SIGTERM if the parent dies.
- the core dies: every API server sees it at once (a pidfd), fails its requests in flight, answers /health with a
  503 and exits 1; the parent reaps them and exits 1.
- an API server dies: the others are stopped, then the core; exit 1.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from pagedllm.config import EngineConfig
from pagedllm.engine.core_client import CoreAttachment, EngineStartupError, MultiprocessCoreClient
from pagedllm.logger import configure_logging

logger = logging.getLogger("pagedllm.server")

_WATCH_INTERVAL_S = 0.5  # how often the parent looks at a stop request between its children's exits
_EXIT_MARGIN_S = 15.0  # past the grace period, how long an API server may take to exit before it is killed
_LISTEN_BACKLOG = 2048  # a burst of connections waits here while the API servers accept


@dataclass
class _ApiServer:
    index: int
    process: multiprocessing.process.BaseProcess
    ready: multiprocessing.connection.Connection  # the child sends None once serving, or why it could not start


class _StopRequest:
    """SIGTERM / SIGINT to the parent: noted here, acted on by the watching loop."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        logger.info("Received %s: draining every API server process", signal.Signals(signum).name)
        self.requested = True


def run_api_servers(args: argparse.Namespace) -> int:
    """Serve with ``args.api_server_count`` API server processes; the exit code (0 after SIGTERM/SIGINT)."""
    from pagedllm.engine.frontend import start_shared_core
    from pagedllm.entrypoints.openai.server import log_serving, prepare_serving

    model, engine_args = prepare_serving(args)
    stop = _StopRequest()
    listeners = _listen(args.host, args.port, args.api_server_count)
    metrics_dir = tempfile.mkdtemp(prefix="pagedllm-metrics-")
    spawner = servers = None
    try:
        spawner, config = start_shared_core(engine_args.create_engine_config(), args.api_server_count,
                                            warm_up_grammars=True)
        logger.info("Engine core process %d serves %d API server processes", spawner.process.pid,
                    args.api_server_count)
        servers = [_start_api_server(args, config, attachment, listener, metrics_dir)
                   for attachment, listener in zip(spawner.attachments(), listeners)]
        _wait_until_serving(servers, spawner, stop)
        if not stop.requested:
            log_serving(model, args, f" with {len(servers)} API server processes")
        return _watch(servers, spawner, stop, args.graceful_shutdown_timeout)
    except EngineStartupError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        _stop_all(servers or [], spawner, args.graceful_shutdown_timeout)
        for listener in listeners:
            listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _listen(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per API server process, all on ``host:port`` (SO_REUSEPORT: the kernel hashes each new
    connection to one of them; only this user's processes may join the group). Bound here, before anything starts,
    so that a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listeners = []
    for _ in range(count):
        listener = socket.create_server((host, port), family=family, backlog=_LISTEN_BACKLOG, reuse_port=True)
        listener.set_inheritable(True)
        listeners.append(listener)
        port = listener.getsockname()[1]  # port 0: the one the first socket got
    return listeners


def _start_api_server(args: argparse.Namespace, config: EngineConfig, attachment: CoreAttachment,
                      listener: socket.socket, metrics_dir: str) -> _ApiServer:
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(
        target=api_server_main, name=f"pagedllm-api-server-{attachment.front_end}",
        args=(_picklable(args), config, attachment, listener, metrics_dir, send, os.getpid()))
    process.start()
    send.close()  # the child's end: EOF here if it dies before answering
    logger.info("API server process %d: pid %d", attachment.front_end, process.pid)
    return _ApiServer(attachment.front_end, process, receive)


def _picklable(args: argparse.Namespace) -> argparse.Namespace:
    """The flags without what the command line added to run them (the parser, the subcommand's function)."""
    return argparse.Namespace(**{key: value for key, value in vars(args).items()
                                 if key not in ("func", "command_parser")})


def _wait_until_serving(servers: list[_ApiServer], spawner: MultiprocessCoreClient, stop: _StopRequest) -> None:
    """Return once every API server serves (or a stop was asked for); EngineStartupError naming the first that
    could not start, or the core's death."""
    pending = {server.ready: server for server in servers}
    while pending and not stop.requested:
        for ready in multiprocessing.connection.wait([*pending, spawner.process.sentinel], _WATCH_INTERVAL_S):
            if ready is spawner.process.sentinel:
                raise EngineStartupError(spawner.death_reason())
            server = pending.pop(ready)
            reason = _receive_start_up(server)
            if reason is not None:
                raise EngineStartupError(f"API server process {server.index} failed to start: {reason}")


def _receive_start_up(server: _ApiServer) -> str | None:
    try:
        return server.ready.recv()
    except EOFError:
        server.process.join(1.0)
        return f"it exited (exit code {server.process.exitcode}); its log above says why"


def _watch(servers: list[_ApiServer], spawner: MultiprocessCoreClient, stop: _StopRequest, grace_s: float) -> int:
    """Wait for a stop request or a child's death; the exit code."""
    sentinels = [spawner.process.sentinel, *(server.process.sentinel for server in servers)]
    while not stop.requested:
        multiprocessing.connection.wait(sentinels, _WATCH_INTERVAL_S)
        if not spawner.process.is_alive():
            logger.error("%s; every API server process fails its requests and exits", spawner.death_reason())
            _join(servers, grace_s + _EXIT_MARGIN_S)  # they see the death themselves
            return 1
        gone = [server for server in servers if not server.process.is_alive()]
        if gone:
            logger.error("API server process %d exited (exit code %s); stopping the server", gone[0].index,
                         gone[0].process.exitcode)
            return 1
    _stop_all(servers, spawner, grace_s)
    return 0 if all(server.process.exitcode == 0 for server in servers) else 1


def _stop_all(servers: list[_ApiServer], spawner: MultiprocessCoreClient | None, grace_s: float) -> None:
    """Drain and reap every API server (SIGTERM, then SIGKILL past the grace period), then stop the core.
    Idempotent."""
    for server in servers:
        if server.process.is_alive():
            os.kill(server.process.pid, signal.SIGTERM)
    _join(servers, grace_s + _EXIT_MARGIN_S)
    for server in servers:
        if server.process.is_alive():
            logger.warning("API server process %d did not exit in time; killing it", server.index)
            server.process.kill()
            server.process.join(5.0)
    if spawner is not None:
        spawner.shutdown()


def _join(servers: list[_ApiServer], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for server in servers:
        server.process.join(max(0.0, deadline - time.monotonic()))


# ---- the API server process --------------------------------------------------------------------------------------


def api_server_main(args: argparse.Namespace, config: EngineConfig, attachment: CoreAttachment,
                    listener: socket.socket, metrics_dir: str, ready: multiprocessing.connection.Connection,
                    parent_pid: int) -> None:
    """One API server process: attach to the core, build the app, tell the parent, serve on ``listener``."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C goes to the parent, which forwards one SIGTERM
    _die_with_parent(parent_pid)
    configure_logging(args.log_level, process_tag=f"api server {attachment.front_end}")
    args.api_server_index, args.metrics_dir = attachment.front_end, metrics_dir
    # Stored responses would live in the process that made them, and the next request may reach another one.
    args.max_stored_responses = 0
    engine, app = _build(args, config, attachment, ready)
    from pagedllm.entrypoints.openai.server import _exit_quietly_on_signals, serve_app

    _exit_quietly_on_signals()
    ready.send(None)
    ready.close()
    try:
        exit_code = serve_app(app, engine, args, sockets=[listener])
    finally:
        engine.shutdown()
    sys.exit(exit_code)


def _build(args: argparse.Namespace, config: EngineConfig, attachment: CoreAttachment,
           ready: multiprocessing.connection.Connection):
    """The engine front end and the app; on failure the parent is told why and this process exits 1."""
    from pagedllm.engine.async_engine import AsyncEngine
    from pagedllm.engine.engine import describe_error
    from pagedllm.entrypoints.openai.server import build_app

    engine = None
    try:
        delay_ms = getattr(args, "max_queue_delay_ms", None)
        engine = AsyncEngine(config, args.health_stall_timeout, attachment=attachment,
                             max_queue_delay_s=None if delay_ms is None else delay_ms / 1000)
        return engine, build_app(engine, args)
    except Exception as exc:
        logger.debug("API server start-up failed", exc_info=True)
        ready.send(describe_error(exc))
        if engine is not None:
            engine.shutdown()
        sys.exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM (a graceful drain) when the parent dies, even by SIGKILL: no API server outlives the server."""
    PR_SET_PDEATHSIG = 1  # linux/prctl.h
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's death is not noticed
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
