"""The multiprocess executor: one worker process per rank on this host (``distributed_executor_backend="mp"``).

The engine core starts the workers ('spawn'), each with a duplex pipe. A call is pickled once and the same bytes go
down every pipe (the ``SchedulerOutput`` of a step is the same for every rank); every worker answers each call in
order, and the executor keeps the answer of the output rank (the last pipeline stage's first tensor-parallel rank,
which has the logits; with every rank sampling the same tokens the others' answers are the same or empty).

A step does not wait at launch: ``execute_model_async`` sends the step and returns a handle whose ``result()`` reads
the answers, so the engine schedules the next step while the workers run this one (async scheduling for free; the
workers themselves run each step synchronously). Several steps may be unanswered (one per stage under pipeline
parallelism): each worker runs them in launch order, so an earlier stage starts the next step as soon as it has sent
this one's hidden states on. Every wait is bounded by polling with a timeout and the workers'
process sentinels: a worker that dies (or raises at start-up) makes the executor fail with one clear error
(``WorkerDiedError``) at once, never a hang; from then on every call fails the same way and ``failure`` says why.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import traceback
from collections import deque
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.executor import Executor, WorkerDiedError
from pagedllm.worker.step_output import StepOutput

logger = logging.getLogger(__name__)

_POLL_S = 1.0  # how often a waiting executor (or an idle worker) looks at the other side's liveness
_SHUTDOWN_JOIN_S = 5.0


def _worker_main(config: EngineConfig, rank: int, init_method: str, conn: multiprocessing.connection.Connection,
                 parent_pid: int) -> None:
    """A worker process: build the worker (joining the process group), then answer calls until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine decides when workers stop
    from pagedllm.logger import configure_logging
    from pagedllm.platform import set_engine_cpu_threads
    from pagedllm.worker.worker import Worker

    configure_logging("info", process_tag=f"worker {rank}")
    if config.device == "cpu":
        set_engine_cpu_threads(config.cpu_threads, beside_api_server=True)
    try:
        worker = Worker(config, rank, init_method)
    except BaseException as exc:  # noqa: BLE001 (the parent must hear why, then this process ends)
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", None))
    while True:
        if not conn.poll(_POLL_S):
            if os.getppid() != parent_pid:
                return  # the engine is gone: nobody would read the answers
            continue
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if method == "shutdown":
            conn.send(("ok", None))
            return
        try:
            result = getattr(worker, method)(*args)
            conn.send(("ok", result))
        except Exception as exc:  # noqa: BLE001 (a failed call is answered; the engine decides)
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class MultiprocExecutor(Executor):
    """One worker process per rank (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        from pagedllm.distributed.parallel_state import distributed_init_method

        parallel = config.parallel_config
        self.world_size = parallel.world_size
        # The last stage's first tensor-parallel rank: it has the logits, logprobs and pooled outputs.
        self.output_rank = (parallel.pipeline_parallel_size - 1) * parallel.tensor_parallel_size
        self.failure: str | None = None
        self._unanswered: deque[_PendingStep] = deque()  # launched steps whose answers are not read, oldest first
        init_method = distributed_init_method()
        context = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[multiprocessing.connection.Connection] = []
        for rank in range(self.world_size):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(target=_worker_main, name=f"pagedllm-worker-{rank}", daemon=True,
                                      args=(config, rank, init_method, child_end, os.getpid()))
            process.start()
            child_end.close()
            self.processes.append(process)
            self.conns.append(parent_end)
        try:
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self) -> None:
        """Every worker's ``ready`` (loading takes as long as it takes: no timeout, but a death is seen at once)."""
        for rank in range(self.world_size):
            status, detail = self._receive(rank, during="start-up")
            if status != "ready":
                raise WorkerDiedError(f"Worker {rank} failed to start: {detail}")

    # ---- calls -------------------------------------------------------------------------------------------------

    def _broadcast(self, method: str, args: tuple) -> None:
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)  # serialized once for all ranks
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                self._fail(f"Worker {rank} is gone (exit code {self.processes[rank].exitcode})")

    def _receive(self, rank: int, during: str = "a call") -> tuple[str, Any]:
        """The next answer of ``rank``, waiting while that worker (and every other) is alive."""
        conn = self.conns[rank]
        while True:
            ready = multiprocessing.connection.wait([conn, *[p.sentinel for p in self.processes]], _POLL_S)
            if conn in ready:
                try:
                    return conn.recv()
                except (EOFError, OSError):
                    pass  # the worker closed its end: it is dying, its exit code says how
            dead = [r for r, p in enumerate(self.processes) if not p.is_alive()]
            if dead:
                codes = ", ".join(f"worker {r} exit code {self.processes[r].exitcode}" for r in dead)
                self._fail(f"A worker process died during {during} ({codes})")

    def _gather(self, during: str) -> Any:
        """Every rank's answer to the oldest call; the output rank's result (a failed call raises)."""
        results = [self._receive(rank, during) for rank in range(self.world_size)]
        errors = [f"worker {rank}: {detail}" for rank, (status, detail) in enumerate(results) if status == "error"]
        if errors:
            raise RuntimeError("; ".join(errors))
        return [detail for _, detail in results]

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            logger.error("%s; the engine cannot run steps any more", reason)
        raise WorkerDiedError(self.failure)

    def _read_unanswered(self) -> None:
        while self._unanswered:
            self._unanswered[0].result()

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        self._read_unanswered()  # answers come in call order
        self._broadcast(method, args)
        return self._gather(method)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        self._broadcast("execute_model", (scheduler_output,))
        step = _PendingStep(self)
        self._unanswered.append(step)
        return step

    def startup_info(self) -> dict:
        infos = self.collective_rpc("startup_info")
        info = dict(infos[self.output_rank])
        info["weight_bytes"] = max(i["weight_bytes"] for i in infos)  # per rank: the largest share
        return info

    def check_health(self) -> None:
        """Raise ``WorkerDiedError`` when a worker is gone."""
        if self.failure is None:
            dead = [r for r, p in enumerate(self.processes) if not p.is_alive()]
            if dead:
                self.failure = f"Worker process(es) {dead} died"
        if self.failure is not None:
            raise WorkerDiedError(self.failure)

    def shutdown(self) -> None:
        """Ask every live worker to stop, then make sure it has (terminate after a grace period)."""
        data = pickle.dumps(("shutdown", ()))
        for process, conn in zip(self.processes, self.conns):
            if process.is_alive():
                try:
                    conn.send_bytes(data)
                except (BrokenPipeError, OSError):
                    pass
        # After a failure the live workers may wait in a collective for the dead one: no grace period then.
        grace_s = _SHUTDOWN_JOIN_S if self.failure is None else 0.1
        for process in self.processes:
            process.join(grace_s)
            if process.is_alive():
                process.terminate()
                process.join(_SHUTDOWN_JOIN_S)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []


class _PendingStep:
    """A launched step: ``result()`` reads every rank's answer (in launch order) and returns the output rank's."""

    def __init__(self, executor: MultiprocExecutor) -> None:
        self.executor = executor
        self._output: ModelRunnerOutput | None = None
        self._error: BaseException | None = None

    def result(self) -> ModelRunnerOutput:
        executor = self.executor
        if self._output is None and self._error is None:
            while executor._unanswered and executor._unanswered[0] is not self:
                executor._unanswered[0].result()  # older steps' answers come first
            try:
                self._output = executor._gather("a step")[executor.output_rank]
            except BaseException as exc:
                self._error = exc
            finally:
                if executor._unanswered and executor._unanswered[0] is self:
                    executor._unanswered.popleft()
        if self._error is not None:
            raise self._error
        return self._output
