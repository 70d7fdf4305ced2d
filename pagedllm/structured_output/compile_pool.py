"""Grammar compilation in worker processes that can be killed: one pathological grammar costs only its own request.

Why processes and not threads: xgrammar's parse and compile (C++ behind nanobind) hold the GIL for long stretches.
Measured on this CPU (2 cores) with ``tests/structured_output/slow_grammars.py``: compiling the slow grammar on a
thread of the server process left an asyncio ticker's longest gap at seconds, which is the freeze of issue 13
(finding 2); in a worker process the ticker's longest gap stays in milliseconds (``test_compile_pool.py`` asserts
< 100 ms). A thread also cannot be stopped: a compile past its deadline kept a pool thread (and the exit of the
server) for as long as it ran. Here such a worker is killed and replaced.

Protocol. A worker rebuilds the vocabulary tables once from a serialized payload (``setup(payload, num_threads)``
returns its compile function), says ``("ready",)``, then serves jobs ``(kind, spec)`` one at a time, answering
``("parsed",)`` once the spec parsed and then ``("compiled", serialized, slow_masks)``, or ``("failed", message)``.
The parent loads each result with ``load(serialized, slow_masks)``. One supervisor thread dispatches queued jobs to
idle workers, reads answers, and enforces deadlines; it waits in ``connection.wait`` (the GIL is free meanwhile).

A worker is a fresh interpreter (``subprocess``, like multiprocessing's 'spawn' but without re-running the parent's
``__main__``): the server process may hold CUDA and many threads, which a fork would copy half-alive. Starting one
costs ~5 s of CPU (xgrammar imports torch), paid at the first constrained request and after each kill.

Priority. A ready worker lowers its own priority to nice 19 (``WORKER_NICENESS``), for itself and for its
autogroup (it leads its own session; where the kernel schedules by autogroup, only the group's nice counts against
the server's processes). Start-up keeps the normal priority: a request may be waiting for it. Measured with
``tests/entrypoints/openai/test_server_isolation.py`` (2 cores, two ~18 s compiles, deadline 5 s): at nice 0 the two
compiling workers took both cores and other clients' plain completions had a p99 of ~1.75 s; at nice 19 it is
0.055-0.063 s and /health's 0.012-0.015 s (3 runs; the issue's bounds are 0.5 s and 0.1 s). Lesser values were not
measured: 19 costs the compiles nothing when the CPU is otherwise idle, and serving latency is what must not move.

Spare. Besides ``num_workers`` the pool keeps one warm spare (started once the others are ready, in the background
at nice 19). A killed worker's place is taken by the spare at once; when every worker is busy and a job has waited
``SPARE_AFTER_S`` (a burst of cheap jobs waits for the running ones instead) the spare takes it and the pool grows,
up to ``max_workers`` processes (default max(num_workers + 1, cores)); a new spare then starts in the background, and
workers idle beyond the base ones and the spare for ``RETIRE_AFTER_S`` are stopped. The next job is the oldest of
the client with the fewest compiles running. In the isolation test a cheap grammar sent during the two slow compiles
answers in 0.31-0.41 s (it waited for the killed worker's replacement to start before: 5-10 s), and the slow
requests fail 5.5-5.7 s after they were sent.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
import multiprocessing.connection
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

# A fresh interpreter (not multiprocessing's spawn, which re-runs the parent's ``__main__`` in the child).
_WORKER_COMMAND = "import sys; from pagedllm.structured_output.compile_pool import worker_main; worker_main(int(sys.argv[1]))"
_MAX_FAILED_STARTS = 3
# How long a queued job may wait for a worker beyond its own compile time: a worker takes seconds to start (the
# first compile after start-up or after a kill waits for one), and the others' compiles are bounded by theirs.
WORKER_START_ALLOWANCE_S = 30.0
# A queued job may take the spare worker once it has waited this long with every worker busy: long enough that a
# burst of cheap compiles (milliseconds each) waits for the running ones, short next to any compile deadline.
SPARE_AFTER_S = 0.25
# Workers beyond the base ones and the spare are stopped after this long idle (each holds ~200 MB: torch).
RETIRE_AFTER_S = 30.0
# The priority of a ready worker (see the module docstring: what keeps serving latency on 2 busy cores).
WORKER_NICENESS = 19
# A worker killed at its deadline, or at shutdown, gets this long to exit before the parent stops waiting for it.
_KILL_JOIN_S = 0.2

CompileFn = Callable[[str, Any, Callable[[], None]], tuple[Any, bool]]


class GrammarCompileAbandoned(RuntimeError):
    """The compile pool shut down before this grammar compiled (the server is stopping)."""


class CompileTimeout(ValueError):
    """A grammar compiled (or waited for a worker) past its deadline; its worker was killed."""


def too_deep_message(kind: str) -> str:
    return f"structured_outputs.{kind} is too deeply nested"


def timeout_message(kind: str, timeout_s: float) -> str:
    return f"structured_outputs.{kind}: the grammar took longer than {timeout_s:g} s to compile"


@dataclass(eq=False)
class CompileJob:
    """One spec to compile: ``parsed`` resolves (None) once it parsed, ``compiled`` to the loaded grammar; both
    fail with ValueError on a bad spec, a crash of the compiler or a missed deadline."""

    kind: str
    spec: Any
    timeout_s: float
    deadline: float  # while queued: the latest start (a worker may still be starting); once running: its end
    num_bytes: int = 0  # the serialized size of the compiled grammar, once compiled
    client_id: str | None = None  # whose compile it is (the first requester's, for a shared one)
    submitted_at: float = field(default_factory=time.monotonic)
    parsed: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    compiled: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def fail(self, exc: BaseException) -> None:
        _settle(self.parsed, exc=exc)
        _settle(self.compiled, exc=exc)


def _reap(process: subprocess.Popen, timeout_s: float) -> None:
    """Collect a killed worker's exit status (no zombie), waiting at most ``timeout_s``."""
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("A killed grammar compile worker (pid %s) has not exited yet", process.pid)


def _settle(future: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve ``future`` unless it is resolved already (a job can fail after it parsed)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


# ---- the worker process -------------------------------------------------------------------------------------------


def serve_compiles(conn: Connection, setup: Callable[[str, int], CompileFn], payload: str, num_threads: int,
                   max_result_bytes: int) -> None:
    """Main function of a worker process: build the compiler once, then compile jobs until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a worker ends
    compile_fn = setup(payload, num_threads)
    lower_priority(WORKER_NICENESS)  # after the start-up, which a request may be waiting for
    try:
        conn.send(("ready",))
        while True:
            kind, spec = conn.recv()
            conn.send(_compile_one(compile_fn, kind, spec, lambda: conn.send(("parsed",)), max_result_bytes))
    except (EOFError, OSError):
        return  # the parent closed the pipe (or is gone): nothing left to do


def lower_priority(niceness: int) -> None:
    """Make this process yield the CPU to serving: nice ``niceness``, for this process and for its autogroup (the
    worker leads its own session, hence its own autogroup: where the kernel schedules by autogroup, the process's
    nice value only orders it against its own group, and the group's nice is what counts against the server)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(niceness, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError:
        pass
    for _ in range(10):  # the kernel accepts about 10 autogroup changes a second machine-wide (EAGAIN past that)
        try:
            with open("/proc/self/autogroup", "w") as autogroup:
                autogroup.write(str(niceness))
            return
        except BlockingIOError:
            time.sleep(0.15)
        except OSError:  # no autogroups (not Linux, or a kernel without them): the process's nice is what counts
            return


def _compile_one(compile_fn: CompileFn, kind: str, spec: Any, report_parsed: Callable[[], None],
                 max_result_bytes: int) -> tuple:
    try:
        serialized, slow_masks = compile_fn(kind, spec, report_parsed)
    except ValueError as exc:
        return ("failed", str(exc))
    except RecursionError:
        return ("failed", too_deep_message(kind))
    except Exception as exc:  # an unexpected compiler error is this spec's problem, not the worker's
        return ("failed", f"structured_outputs.{kind} could not be compiled: {type(exc).__name__}: {exc}"[:500])
    if len(serialized) > max_result_bytes:  # loading it would hold the server's GIL for long, and not fit the cache
        return ("failed", f"structured_outputs.{kind}: the compiled grammar is too large "
                          f"({len(serialized):,} bytes, at most {max_result_bytes:,})")
    return ("compiled", serialized, slow_masks)


# ---- the parent side ------------------------------------------------------------------------------------------------


def worker_main(fd: int) -> None:
    """Entry point of a worker process (``_WORKER_COMMAND``): its setup arrives as the first message."""
    conn = Connection(fd)
    setup, payload, num_threads, max_result_bytes, in_background = conn.recv()
    if in_background:  # a spare: nobody waits for its start
        lower_priority(WORKER_NICENESS)
    serve_compiles(conn, setup, payload, num_threads, max_result_bytes)


def _worker_environment() -> dict[str, str]:
    """The parent's environment, with its import path (the worker imports the backend's setup function by name)."""
    paths = [path for path in sys.path if path and os.path.isdir(path)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    conn: Connection
    is_ready: bool = False
    job: CompileJob | None = None
    idle_since: float = field(default_factory=time.monotonic)  # since it became ready or finished its last job

    @property
    def is_free(self) -> bool:
        return self.is_ready and self.job is None


class CompilePool:
    """``num_workers`` compile processes plus a warm spare, a queue of jobs, and deadlines: a job past its deadline
    fails, and the worker compiling it is killed (the spare takes its place). When every worker is busy and a job
    has waited ``spare_after_s``, the spare takes it and the pool grows (up to ``max_workers`` processes); extra
    workers idle for ``retire_after_s`` are stopped."""

    def __init__(
        self,
        setup: Callable[[str, int], CompileFn],
        payload: str,
        load: Callable[[Any, bool], Any],
        num_workers: int = 2,
        threads_per_worker: int = 1,
        max_result_bytes: int = 64 << 20,
        max_workers: int | None = None,
        spare_after_s: float = SPARE_AFTER_S,
        retire_after_s: float = RETIRE_AFTER_S,
    ) -> None:
        self._setup, self._payload, self._load = setup, payload, load
        self._threads_per_worker = threads_per_worker
        self._max_result_bytes = max_result_bytes
        self._num_workers = num_workers
        self._max_workers = max(num_workers + 1, max_workers or os.cpu_count() or 1)  # room for the spare, always
        self._spare_after_s, self._retire_after_s = spare_after_s, retire_after_s
        self._lock = threading.Lock()
        self._queue: collections.deque[CompileJob] = collections.deque()
        self._wake_reader, self._wake_writer = multiprocessing.connection.Pipe(duplex=False)
        self._is_closed = False
        self._num_failed_starts = 0
        self._started_at, self._announced_ready = time.monotonic(), False
        self._workers = [self._start_worker(in_background=False) for _ in range(num_workers)]
        self._thread = threading.Thread(target=self._supervise, name="pagedllm-grammar-pool", daemon=True)
        self._thread.start()

    @staticmethod
    def max_wait_s(timeout_s: float) -> float:
        """The longest a job submitted with ``timeout_s`` can take to resolve: queued, then compiling."""
        return 2 * timeout_s + WORKER_START_ALLOWANCE_S

    def submit(self, kind: str, spec: Any, timeout_s: float, client_id: str | None = None) -> CompileJob:
        """Queue a compile of ``spec``: it fails if it compiles for longer than ``timeout_s`` seconds, or if it is
        still queued ``timeout_s + WORKER_START_ALLOWANCE_S`` seconds from now. ``client_id``: whose it is (the
        next job goes to the client with the fewest compiles running)."""
        job = CompileJob(kind, spec, timeout_s, time.monotonic() + timeout_s + WORKER_START_ALLOWANCE_S,
                         client_id=client_id)
        with self._lock:
            if self._is_closed:
                job.fail(GrammarCompileAbandoned("structured output compilation is shut down"))
                return job
            self._queue.append(job)
        self._wake()
        return job

    def shutdown(self) -> None:
        """Kill the workers without waiting for their compiles; every unfinished job fails with
        GrammarCompileAbandoned. Bounded: about ``_KILL_JOIN_S`` per worker at most, usually far less."""
        if self._is_closed:
            return
        self._fail_everything(GrammarCompileAbandoned("structured output compilation was abandoned: the server is "
                                                      "stopping"))
        self._wake()
        deadline = time.monotonic() + _KILL_JOIN_S
        self._thread.join(_KILL_JOIN_S)
        for worker in list(self._workers):  # again: the supervisor may have started one meanwhile
            worker.process.kill()
            _reap(worker.process, max(0.0, deadline - time.monotonic()))

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def worker_pids(self) -> list[int | None]:
        return [worker.process.pid for worker in list(self._workers)]

    def ready_worker_pids(self) -> list[int]:
        """The workers that finished starting (their priority is lowered by then)."""
        return [worker.process.pid for worker in list(self._workers) if worker.is_ready]

    # ---- the supervisor thread -------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._is_closed:
            now = time.monotonic()
            self._dispatch(now)
            self._keep_a_spare()
            self._retire_idle(now)
            connections = [self._wake_reader] + [worker.conn for worker in self._workers]
            for connection in wait(connections, timeout=self._seconds_to_next_event(now)):
                if connection is self._wake_reader:
                    self._drain_wakeups()
                elif not self._is_closed:
                    self._on_message(connection)
            if not self._is_closed:
                self._expire(time.monotonic())
        for worker in self._workers:
            worker.process.kill()

    def _dispatch(self, now: float) -> None:
        for worker in [worker for worker in self._workers if worker.is_free]:
            job = self._next_job(now)
            if job is None:
                return
            worker.job = job
            job.deadline = time.monotonic() + job.timeout_s  # the deadline is for the compile itself
            try:
                worker.conn.send((job.kind, job.spec))
            except (OSError, ValueError) as exc:  # died between jobs (or the spec does not pickle)
                self._remove(worker, ValueError(f"structured_outputs.{job.kind} could not be sent to the "
                                                f"grammar compiler: {type(exc).__name__}"))

    def _next_job(self, now: float) -> CompileJob | None:
        """The queued job to run next, if any may run now: the oldest of the client with the fewest compiles
        running. Past ``num_workers`` busy workers only a job that waited ``spare_after_s`` may take the spare:
        a short burst waits for the running compiles (milliseconds, usually) instead of using up the spare."""
        running = collections.Counter(worker.job.client_id for worker in self._workers if worker.job is not None)
        saturated = sum(running.values()) >= self._num_workers
        with self._lock:
            eligible = [job for job in self._queue if not saturated or now - job.submitted_at >= self._spare_after_s]
            if not eligible:
                return None
            job = min(eligible, key=lambda job: (running[job.client_id], job.submitted_at))
            self._queue.remove(job)
            return job

    def _target_size(self) -> int:
        """How many workers to keep: the busy ones (at least ``num_workers``) and one spare, at most max_workers."""
        num_busy = sum(worker.job is not None for worker in self._workers)
        return min(self._max_workers, max(self._num_workers, num_busy) + 1)

    def _keep_a_spare(self) -> None:
        """Start the workers missing from ``_target_size`` (a killed one, a spare taken). The spare is started
        only once the others are ready, so that it does not slow their start (the first ones of a server), unless
        jobs are waiting for one."""
        if self._is_closed or not (self._queue or all(worker.is_ready for worker in self._workers)):
            return
        while len(self._workers) < self._target_size():
            self._workers.append(self._start_worker(in_background=not self._queue))

    def _retire_idle(self, now: float) -> None:
        """Stop workers idle for ``retire_after_s`` beyond ``_target_size``: the pool shrinks back after a burst."""
        for worker in [worker for worker in self._workers if worker.is_free]:
            if len(self._workers) <= self._target_size():
                return
            if now - worker.idle_since >= self._retire_after_s:
                self._remove(worker, None)

    def _seconds_to_next_event(self, now: float) -> float | None:
        """Until the next deadline, the next queued job allowed to take the spare, or the next idle retirement."""
        times = [worker.job.deadline for worker in self._workers if worker.job is not None]
        with self._lock:
            times += [job.deadline for job in self._queue]
            times += [job.submitted_at + self._spare_after_s for job in self._queue
                      if job.submitted_at + self._spare_after_s > now]
        if len(self._workers) > self._target_size():
            times += [worker.idle_since + self._retire_after_s for worker in self._workers if worker.is_free]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _on_message(self, connection: Connection) -> None:
        worker = next((w for w in self._workers if w.conn is connection), None)
        if worker is None:  # removed earlier in this round
            return
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._on_worker_died(worker)
            return
        tag, job = message[0], worker.job
        if tag == "ready":
            worker.is_ready, worker.idle_since = True, time.monotonic()
            self._num_failed_starts = 0
            self._announce_ready()
        elif tag == "parsed" and job is not None:
            _settle(job.parsed)
        elif job is not None:
            worker.job, worker.idle_since = None, time.monotonic()
            self._finish(job, message)

    def _announce_ready(self) -> None:
        """Log once when the first workers are all ready: until then their start-up takes CPU (and a benchmark
        started earlier measures some of it)."""
        if not self._announced_ready and all(worker.is_ready for worker in self._workers):
            self._announced_ready = True
            logger.info("Grammar compile workers ready (%d, %.1f s after the pool started)", len(self._workers),
                        time.monotonic() - self._started_at)

    def _on_worker_died(self, worker: _Worker) -> None:
        if not worker.is_ready:
            self._num_failed_starts += 1
            if self._num_failed_starts >= _MAX_FAILED_STARTS:  # it would only crash again: stop trying, loudly
                logger.error("Grammar compile workers fail to start (exit code %s); structured outputs are off",
                             worker.process.poll())
                self._fail_everything(ValueError("structured_outputs: the grammar compiler cannot start"))
                return
        kind = worker.job.kind if worker.job is not None else "grammar"
        logger.warning("A grammar compile worker (pid %s) died; starting another", worker.process.pid)
        self._remove(worker, ValueError(f"structured_outputs.{kind}: the grammar compiler crashed on it"))

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            self._is_closed = True
            jobs = list(self._queue) + [worker.job for worker in self._workers if worker.job is not None]
            self._queue.clear()
        for worker in self._workers:
            worker.process.kill()
        for job in jobs:
            job.fail(error)

    def _finish(self, job: CompileJob, message: tuple) -> None:
        if message[0] == "failed":
            job.fail(ValueError(message[1]))
            return
        try:
            loaded = self._load(message[1], message[2])
        except Exception as exc:  # a result that does not load is this spec's failure
            job.fail(ValueError(f"structured_outputs.{job.kind}: the compiled grammar did not load ({exc})"))
            return
        job.num_bytes = len(message[1])
        _settle(job.parsed)
        _settle(job.compiled, loaded)

    def _expire(self, now: float) -> None:
        with self._lock:
            expired = [job for job in self._queue if job.deadline <= now]
            for job in expired:
                self._queue.remove(job)
        for job in expired:
            job.fail(CompileTimeout(timeout_message(job.kind, job.timeout_s)))
        for worker in list(self._workers):
            if worker.job is not None and worker.job.deadline <= now:
                logger.warning("A grammar compile passed its %.3g s deadline; killing its worker (pid %s)",
                               worker.job.timeout_s, worker.process.pid)
                self._remove(worker, CompileTimeout(timeout_message(worker.job.kind, worker.job.timeout_s)))

    def _remove(self, worker: _Worker, error: BaseException | None) -> None:
        """Kill ``worker`` and fail its job with ``error``; the next round starts what ``_target_size`` misses
        (a spare that is ready meanwhile takes the next job at once)."""
        job, worker.job = worker.job, None
        worker.process.kill()
        _reap(worker.process, _KILL_JOIN_S)
        if not self._is_closed:
            worker.conn.close()
            self._workers.remove(worker)
        if job is not None and error is not None:
            job.fail(error)

    def _start_worker(self, in_background: bool) -> _Worker:
        parent_socket, child_socket = socket.socketpair()
        with child_socket:
            process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_COMMAND, str(child_socket.fileno())],
                pass_fds=[child_socket.fileno()], stdin=subprocess.DEVNULL, env=_worker_environment(),
                start_new_session=True,  # a terminal's Ctrl-C / SIGTERM go to the server, which decides
            )
        conn = Connection(parent_socket.detach())
        conn.send((self._setup, self._payload, self._threads_per_worker, self._max_result_bytes, in_background))
        return _Worker(process, conn)

    def _wake(self) -> None:
        try:
            self._wake_writer.send_bytes(b"w")
        except OSError:
            pass

    def _drain_wakeups(self) -> None:
        while self._wake_reader.poll():
            self._wake_reader.recv_bytes()
