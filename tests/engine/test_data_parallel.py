"""DataParallelEngine over fake replicas (no model, no process): routing, the replica holding a request (its stream,
its abort), a dead replica's requests failing with its name while the others serve, health vs readiness, the
per-engine metric labels, and the per-replica configs. The server with real core processes:
tests/entrypoints/openai/test_server_data_parallel.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pagedllm.config import ParallelConfig
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.engine.data_parallel import DataParallelEngine, max_num_running, stats_sources
from pagedllm.engine.metrics import Metric

BLOCK = 16
CONFIG = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK), parallel_config=ParallelConfig(),
                         scheduler_config=SimpleNamespace(max_num_seqs=8))


class FakeReplica:
    """AsyncEngine's surface, with outputs the test hands over by request id."""

    def __init__(self) -> None:
        self.config = CONFIG
        self.queues: dict[str, asyncio.Queue] = {}
        self.aborted: list[str] = []
        self.dead_reason: str | None = None
        self.draining = False
        self._callbacks = []

    async def generate(self, prompt, params, request_id, priority=0, lora_request=None, timeout_s=None):
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        queue = self.queues[request_id] = asyncio.Queue()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def die(self) -> None:
        self.dead_reason = "The engine core process died (exit code -9)"
        for queue in self.queues.values():
            queue.put_nowait(EngineDeadError(self.dead_reason))
        for callback in self._callbacks:
            callback()

    def on_core_death(self, callback) -> None:
        self._callbacks.append(callback)

    @property
    def core_died(self) -> bool:
        return self.dead_reason is not None

    @property
    def is_running(self) -> bool:
        return self.dead_reason is None

    def is_ready(self) -> bool:
        return self.is_running and not self.draining

    def health_reason(self) -> str | None:
        return self.dead_reason

    def is_healthy(self) -> bool:
        return self.dead_reason is None

    def begin_draining(self) -> None:
        self.draining = True

    @property
    def num_requests_in_flight(self) -> int:
        return len(self.queues)

    def get_metrics(self) -> list[Metric]:
        return [Metric("pagedllm:num_requests_running", "gauge", float(len(self.queues))),
                Metric("pagedllm:request_success_total", "counter", 1.0, {"finished_reason": "stop"})]

    def shutdown(self, timeout: float = 10.0) -> None:
        self.draining = True


def _output(finished: bool) -> SimpleNamespace:
    return SimpleNamespace(finished=finished)


def _engine(num_replicas: int = 2) -> tuple[DataParallelEngine, list[FakeReplica]]:
    replicas = [FakeReplica() for _ in range(num_replicas)]
    return DataParallelEngine(replicas), replicas


async def _start(engine: DataParallelEngine, request_id: str, prompt=None):
    """A request's stream, advanced until the replica has it."""
    stream = engine.generate(prompt or {"prompt_token_ids": [1, 2, 3]}, None, request_id)
    task = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    return stream, task


def test_requests_go_to_the_least_loaded_replica_and_stream_from_it():
    async def run() -> None:
        engine, replicas = _engine()
        _, first = await _start(engine, "a")
        stream, second = await _start(engine, "b")
        assert (engine.replica_of("a"), engine.replica_of("b")) == (0, 1)
        assert engine.router.outstanding == [1, 1]
        replicas[1].queues["b"].put_nowait(_output(True))
        assert (await second).finished
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        assert engine.router.outstanding == [1, 0] and engine.replica_of("b") is None
        engine.abort("a")  # the abort reaches the replica holding the request
        assert replicas[0].aborted == ["a"]
        first.cancel()

    asyncio.run(run())


def test_closing_a_stream_aborts_on_its_replica_and_frees_its_place():
    async def run() -> None:
        engine, replicas = _engine()
        stream, task = await _start(engine, "a")
        replicas[0].queues["a"].put_nowait(_output(False))
        await task
        await stream.aclose()
        assert replicas[0].aborted == ["a"] and engine.router.outstanding == [0, 0]

    asyncio.run(run())


def test_a_dead_replica_fails_its_requests_by_name_and_the_other_serves():
    async def run() -> None:
        engine, replicas = _engine()
        died = []
        engine.on_core_death(lambda: died.append(True))
        _, on_zero = await _start(engine, "a")
        _, on_one = await _start(engine, "b")
        replicas[1].die()
        with pytest.raises(EngineDeadError, match="Data-parallel engine 1 of 2 died"):
            await on_one
        assert not died and not engine.core_died  # one replica serves: the server goes on
        assert "engine 1 of 2" in engine.health_reason()
        assert engine.serving_reason() is None and engine.is_ready()
        for index in range(3):  # new requests skip the dead replica
            _, task = await _start(engine, f"new-{index}")
            assert engine.replica_of(f"new-{index}") == 0
            task.cancel()
        replicas[0].die()
        with pytest.raises(EngineDeadError):
            await on_zero
        assert died == [True] and engine.core_died and engine.serving_reason() is not None
        with pytest.raises(EngineDeadError, match="No data-parallel engine is serving"):
            await engine.generate({"prompt_token_ids": [1]}, None, "late").__anext__()

    asyncio.run(run())


def test_a_draining_engine_refuses_new_requests():
    async def run() -> None:
        engine, replicas = _engine()
        engine.begin_draining()
        assert all(replica.draining for replica in replicas) and not engine.is_ready()
        with pytest.raises(EngineDeadError, match="draining"):
            await engine.generate({"prompt_token_ids": [1]}, None, "a").__anext__()

    asyncio.run(run())


def test_duplicate_request_ids_are_refused_across_replicas():
    async def run() -> None:
        engine, _ = _engine()
        _, task = await _start(engine, "a")
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate({"prompt_token_ids": [1]}, None, "a").__anext__()
        task.cancel()

    asyncio.run(run())


def test_metrics_carry_an_engine_label_and_stats_lines_are_per_replica():
    engine, _ = _engine(3)
    metrics = engine.get_metrics()
    assert [metric.labels.get("engine") for metric in metrics] == ["0", "0", "1", "1", "2", "2"]
    assert metrics[1].labels == {"engine": "0", "finished_reason": "stop"}
    assert [tag for tag, _ in stats_sources(engine, "tiny")] == ["tiny engine 0", "tiny engine 1", "tiny engine 2"]
    assert max_num_running(engine) == 24


def test_parallel_config_rank_and_layout():
    assert ParallelConfig(data_parallel_size=4, data_parallel_rank=3).layout == "dp4 x tp1 x pp1"
    with pytest.raises(ValueError, match="data_parallel_rank"):
        ParallelConfig(data_parallel_size=2, data_parallel_rank=2)


def test_replica_devices_are_consecutive_slices(monkeypatch):
    from pagedllm.config import replica_cuda_visible_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    layout = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp", "data_parallel_size": 2}
    assert replica_cuda_visible_devices(ParallelConfig(**layout, data_parallel_rank=1)) == "6,7"
    assert replica_cuda_visible_devices(ParallelConfig()) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="needs 4 GPUs, 2 visible"):
        replica_cuda_visible_devices(ParallelConfig(**layout, data_parallel_rank=0))
