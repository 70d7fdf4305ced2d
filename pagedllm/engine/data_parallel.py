"""Data parallelism: ``DataParallelEngine`` runs N identical AsyncEngines (replicas), each with its own engine core
process and, on CUDA, its own devices, behind the surface of one AsyncEngine, so the single-model server and each
model of a server of several models serve it unchanged (``serve --data-parallel-size N``).

- Routing: ``dp_router.ReplicaRouter`` picks the replica of each request (fewest outstanding requests, prefix-cache
  affinity inside a load bound). The request then lives on that replica: its stream, its abort (the replica's own
  ``generate`` aborts it when the consumer stops, ``abort`` here finds the replica by request id).
- Devices: replica i's core process is started with ``CUDA_VISIBLE_DEVICES`` set to its slice of the visible
  devices (``config.replica_cuda_visible_devices``: devices i*tp*pp .. (i+1)*tp*pp - 1), so inside it device 0 is
  its first GPU and its tensor/pipeline ranks (the "mp" executor's worker processes inherit the variable) see only
  its GPUs. On CPU every replica shares the cores: each gets an equal share of the engine threads.
- Failure: a replica whose core process dies fails its own requests (EngineDeadError naming the replica: 503);
  the others keep serving and new requests skip it. ``health_reason`` names it (``/health`` 503: a restart brings
  it back), ``serving_reason`` is None while any replica serves (``/ready`` 200). ``on_core_death`` callbacks run
  once every replica is dead.
- Metrics: every replica's metrics, each with an ``engine`` label (its index), as vLLM labels them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from dataclasses import replace

from pagedllm.config import EngineArgs, EngineConfig, replica_cuda_visible_devices
from pagedllm.engine.async_engine import DEFAULT_HEALTH_STALL_TIMEOUT_S, AsyncEngine
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.engine.dp_router import NoLiveReplicaError, ReplicaRouter, affinity_key
from pagedllm.engine.metrics import Metric
from pagedllm.engine.processing import PromptInput
from pagedllm.lora.request import LoRARequest
from pagedllm.params import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


def replica_configs(config: EngineConfig, data_parallel_size: int) -> list[EngineConfig]:
    """The engine config of each replica: the same, with its data-parallel rank (and on CPU its share of the
    cores' threads, unless the user set a thread count)."""
    cpu_threads = config.cpu_threads
    if config.device == "cpu" and cpu_threads is None:
        from pagedllm.platform import engine_cpu_threads

        cpu_threads = max(1, engine_cpu_threads(None, beside_api_server=True) // data_parallel_size)
    return [replace(config, cpu_threads=cpu_threads if config.device == "cpu" else config.cpu_threads,
                    parallel_config=replace(config.parallel_config, data_parallel_size=data_parallel_size,
                                            data_parallel_rank=rank))
            for rank in range(data_parallel_size)]


@contextmanager
def _replica_devices(config: EngineConfig):
    """While a replica's core process starts: ``CUDA_VISIBLE_DEVICES`` = its devices (a spawned child copies the
    environment as it starts; the API server process itself runs no CUDA work)."""
    devices = replica_cuda_visible_devices(config.parallel_config) if config.device == "cuda" else None
    if devices is None:
        yield None
        return
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        yield devices
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


class DataParallelEngine:
    """N AsyncEngines of one model behind AsyncEngine's surface (see the module doc)."""

    def __init__(self, replicas: list[AsyncEngine], router: ReplicaRouter | None = None) -> None:
        """Serve through ``replicas`` (started; see ``start``), routed by ``router`` (default: ReplicaRouter)."""
        if not replicas:
            raise ValueError("a data-parallel engine needs at least one replica")
        self.replicas = list(replicas)
        self.data_parallel_size = len(self.replicas)
        self.core_process = True
        self.config = self.replicas[0].config
        self.router = router or ReplicaRouter(self.data_parallel_size)
        self._owner: dict[str, int] = {}  # request id -> the replica running it
        self._draining = False
        self._death_callbacks: list[Callable[[], None]] = []
        for rank, replica in enumerate(self.replicas):
            replica.on_core_death(lambda rank=rank: self._on_replica_death(rank))

    @classmethod
    def start(cls, config: EngineConfig, data_parallel_size: int,
              health_stall_timeout_s: float = DEFAULT_HEALTH_STALL_TIMEOUT_S, warm_up_grammars: bool = False,
              max_queue_delay_s: float | None = None) -> DataParallelEngine:
        """Start ``data_parallel_size`` replicas of ``config``, one after another (a GPU's memory profile must not
        see another replica's half-made cache; on CPU they share the memory). Raises what a replica's start raises,
        after stopping those started."""
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {data_parallel_size}")
        replicas: list[AsyncEngine] = []
        try:
            for replica_config in replica_configs(config, data_parallel_size):
                replicas.append(cls._start_replica(replica_config, health_stall_timeout_s, warm_up_grammars,
                                                   max_queue_delay_s))
        except BaseException:
            for replica in replicas:
                replica.shutdown()
            raise
        engine = cls(replicas)
        logger.info("Data parallel: %d engines (layout %s)", data_parallel_size, engine.config.parallel_config.layout)
        return engine

    @classmethod
    def from_engine_args(cls, args: EngineArgs, data_parallel_size: int,
                         health_stall_timeout_s: float = DEFAULT_HEALTH_STALL_TIMEOUT_S, warm_up_grammars: bool = False,
                         max_queue_delay_s: float | None = None) -> DataParallelEngine:
        return cls.start(args.create_engine_config(), data_parallel_size, health_stall_timeout_s, warm_up_grammars,
                         max_queue_delay_s)

    @staticmethod
    def _start_replica(config: EngineConfig, health_stall_timeout_s: float, warm_up_grammars: bool,
                       max_queue_delay_s: float | None) -> AsyncEngine:
        rank = config.parallel_config.data_parallel_rank
        with _replica_devices(config) as devices:
            replica = AsyncEngine(config, health_stall_timeout_s, core_process=True, warm_up_grammars=warm_up_grammars,
                                  max_queue_delay_s=max_queue_delay_s)
        where = f"CUDA devices {devices}" if devices is not None else config.device
        if config.device == "cpu" and config.cpu_threads is not None:
            where += f", {config.cpu_threads} thread(s)"
        logger.info("Data-parallel engine %d of %d: core process %s on %s, %s blocks", rank,
                    config.parallel_config.data_parallel_size, replica.engine.core_client.process.pid, where,
                    replica.engine.num_blocks)
        return replica

    # ---- what the server reads (AsyncEngine's surface) ------------------------------------------------------

    @property
    def engine(self):
        """The first replica's front end (its tokenizer and validators are every replica's)."""
        return self.replicas[0].engine

    @property
    def tokenizer(self):
        return self.replicas[0].tokenizer

    @property
    def model_config(self):
        return self.config.model_config

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.replicas[0].eos_token_ids

    @property
    def structured_output_manager(self):
        """The early check of a constraint compiles in a live replica's pool (the one least loaded now): it tells
        a bad spec from a good one; the replica the request then goes to compiles it again if it is another."""
        live = self._live_flags()
        candidates = [rank for rank in range(self.data_parallel_size) if live[rank]] or [0]
        rank = min(candidates, key=lambda index: self.router.outstanding[index])
        return self.replicas[rank].structured_output_manager

    # ---- requests -------------------------------------------------------------------------------------------

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, priority: int = 0,
        lora_request: LoRARequest | None = None, timeout_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """AsyncEngine.generate on the replica the router picks. A replica that dies under the request ends it with
        EngineDeadError naming the replica."""
        if self._draining:
            raise EngineDeadError("The engine is draining: it takes no new requests")
        if request_id in self._owner:
            raise ValueError(f"Request id {request_id!r} is already in use")
        rank = self._choose(prompt)
        replica = self.replicas[rank]
        self.router.start(rank)
        self._owner[request_id] = rank
        try:
            async with aclosing(replica.generate(prompt, params, request_id, priority, lora_request,
                                                 timeout_s)) as outputs:
                async for output in outputs:
                    yield output
        except EngineDeadError as exc:
            if replica.core_died:
                raise EngineDeadError(f"Data-parallel engine {rank} of {self.data_parallel_size} died: {exc} "
                                      "(the other engines keep serving; retry the request)") from None
            raise
        finally:
            self.router.finish(rank)
            self._owner.pop(request_id, None)

    def _choose(self, prompt: PromptInput) -> int:
        key = affinity_key(prompt, self.config.cache_config.block_size)
        try:
            return self.router.choose(key, self._live_flags())
        except NoLiveReplicaError:
            raise EngineDeadError(f"No data-parallel engine is serving: {self.health_reason()}") from None

    def _live_flags(self) -> list[bool]:
        return [replica.is_ready() and replica.is_healthy() for replica in self.replicas]

    def abort(self, request_id: str) -> None:
        rank = self._owner.get(request_id)
        if rank is not None:
            self.replicas[rank].abort(request_id)

    def remove_lora(self, lora_int_id: int) -> None:
        """AsyncEngine.remove_lora on every replica (each may hold the adapter)."""
        for replica in self.replicas:
            replica.remove_lora(lora_int_id)

    def record_request_timeout(self) -> None:
        """AsyncEngine.record_request_timeout, counted by the first replica (the series are summed by reason)."""
        self.replicas[0].record_request_timeout()

    def replica_of(self, request_id: str) -> int | None:
        """The replica running a request in flight (None once it ended)."""
        return self._owner.get(request_id)

    # ---- health -----------------------------------------------------------------------------------------------

    def on_core_death(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once every replica's core process has died (while one serves, the server goes on)."""
        self._death_callbacks.append(callback)

    def _on_replica_death(self, rank: int) -> None:
        alive = [index for index, replica in enumerate(self.replicas) if not replica.core_died]
        logger.error("Data-parallel engine %d died: %s; %s", rank, self.replicas[rank].health_reason(),
                     f"engines {alive} keep serving" if alive else "no engine is left")
        if not alive:
            for callback in self._death_callbacks:
                callback()

    @property
    def core_died(self) -> bool:
        """Every replica's core process died (the server cannot serve at all)."""
        return all(replica.core_died for replica in self.replicas)

    @property
    def is_running(self) -> bool:
        return any(replica.is_running for replica in self.replicas)

    def is_healthy(self) -> bool:
        return self.health_reason() is None

    def health_reason(self) -> str | None:
        """Each unhealthy replica with why ("engine 1 of 2: ..."), or None when all are healthy."""
        problems = [f"engine {rank} of {self.data_parallel_size}: {reason}"
                    for rank, replica in enumerate(self.replicas) if (reason := replica.health_reason()) is not None]
        return "; ".join(problems) or None

    def serving_reason(self) -> str | None:
        """Why no request can be served (every replica unhealthy), or None while one replica serves: readiness."""
        if any(replica.is_healthy() for replica in self.replicas):
            return None
        return self.health_reason()

    def is_ready(self) -> bool:
        return not self._draining and any(replica.is_ready() for replica in self.replicas)

    def begin_draining(self) -> None:
        self._draining = True
        for replica in self.replicas:
            replica.begin_draining()

    @property
    def num_requests_in_flight(self) -> int:
        return sum(replica.num_requests_in_flight for replica in self.replicas)

    # ---- metrics and shutdown ---------------------------------------------------------------------------------

    def get_metrics(self) -> list[Metric]:
        """Every replica's metrics, labelled ``engine="<rank>"``."""
        return [replace(metric, labels={"engine": str(rank), **metric.labels})
                for rank, replica in enumerate(self.replicas) for metric in replica.get_metrics()]

    def replica_metric_sources(self) -> list[tuple[int, Callable[[], list[Metric]]]]:
        """(rank, get_metrics) per replica, unlabelled: one stats line per replica."""
        return [(rank, replica.get_metrics) for rank, replica in enumerate(self.replicas)]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every replica (in parallel: each waits for its own core process)."""
        self._draining = True
        if self.replicas:
            with ThreadPoolExecutor(len(self.replicas)) as pool:
                list(pool.map(lambda replica: replica.shutdown(timeout), self.replicas))


def make_serving_engine(args: EngineArgs, data_parallel_size: int = 1, *, core_process: bool = True,
                        **kwargs) -> AsyncEngine | DataParallelEngine:
    """The server's engine: one AsyncEngine, or a DataParallelEngine of ``data_parallel_size`` replicas (each
    needs its own engine core process: ``core_process=False`` with more than one replica is a ValueError)."""
    if data_parallel_size == 1:
        return AsyncEngine.from_engine_args(args, core_process=core_process, **kwargs)
    if not core_process:
        raise ValueError("--data-parallel-size > 1 runs each replica in its own engine core process: drop "
                         "--no-engine-core-process")
    return DataParallelEngine.from_engine_args(args, data_parallel_size, **kwargs)


def stats_sources(engine, name: str | None = None) -> list[tuple[str | None, Callable[[], list[Metric]]]]:
    """(tag, get_metrics) of each stats line a server logs for ``engine``: one, or one per data-parallel replica
    (tagged ``engine N``, after ``name`` when given)."""
    if isinstance(engine, DataParallelEngine):
        return [(f"{name} engine {rank}" if name else f"engine {rank}", get_metrics)
                for rank, get_metrics in engine.replica_metric_sources()]
    return [(name, engine.get_metrics)]


def max_num_running(engine) -> int:
    """How many requests the engine runs at once: max_num_seqs of each replica together (admission control)."""
    return engine.config.scheduler_config.max_num_seqs * getattr(engine, "data_parallel_size", 1)


def serving_reason(engine) -> str | None:
    """Why ``engine`` cannot serve new requests (readiness), or None: its health for one engine core; for a
    data-parallel engine, None while one replica serves (its ``health_reason`` names the dead ones)."""
    if isinstance(engine, DataParallelEngine):
        return engine.serving_reason()
    return engine.health_reason()
