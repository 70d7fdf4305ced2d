"""Executors: how the engine core reaches its workers.

The engine core sees one ``Executor`` whatever the layout: every worker receives the same ``SchedulerOutput`` and
the executor returns one ``ModelRunnerOutput`` (the driver's, rank 0: with tensor parallelism every rank computes
the same sampled tokens). Calls go through ``collective_rpc`` by method name with plain-data arguments, so an
executor whose workers live in other processes or on other nodes (issue: multiprocess and Ray executors) only has
to carry those calls; ``InProcessExecutor`` calls its one worker directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.step_output import ReadyOutput, StepOutput
from pagedllm.worker.worker import Worker


class WorkerDiedError(RuntimeError):
    """A worker of a multi-process (or Ray) executor is gone: no step can run any more."""


class Executor(ABC):
    """Drives the workers of one engine (see the module docstring)."""

    # Why the executor cannot run steps any more (a worker died); None while healthy.
    failure: str | None = None

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call ``Worker.<method>(*args)`` on every worker; their results in rank order."""

    def determine_num_blocks(self) -> int:
        """KV blocks every worker can hold: the smallest of their budgets."""
        return min(self.collective_rpc("determine_num_blocks"))

    def num_cpu_blocks(self) -> int:
        return min(self.collective_rpc("num_cpu_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_kv_cache", num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", scheduler_output)[0]

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        """Launch a step without waiting for it (async scheduling); ``result()`` of the answer is its output. An
        executor that cannot overlap steps waits here."""
        return ReadyOutput(self.execute_model(scheduler_output))

    def startup_info(self) -> dict:
        """The driver worker's start-up report."""
        return self.collective_rpc("startup_info")[0]

    def shutdown(self) -> None:
        """Release the workers (nothing to do for in-process ones)."""


def make_executor(config: EngineConfig) -> Executor:
    """The executor ``config.parallel_config.distributed_executor_backend`` names ("uni", "mp" or "ray")."""
    backend = config.parallel_config.distributed_executor_backend
    if config.parallel_config.world_size > 1 and config.lora_config is not None:
        raise ValueError("LoRA adapters are not supported with tensor_parallel_size x pipeline_parallel_size > 1 "
                         "yet (the adapters' weights are not sharded); drop enable_lora or run on one device")
    if backend == "mp":
        from pagedllm.worker.mp_executor import MultiprocExecutor

        return MultiprocExecutor(config)
    if backend == "ray":
        from pagedllm.worker.ray_executor import RayExecutor

        return RayExecutor(config)
    return InProcessExecutor(config)


class InProcessExecutor(Executor):
    """One worker in the engine core's own process and thread."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.driver_worker = Worker(config, rank=0)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.driver_worker, method)(*args)]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        # The hot path: skip the by-name dispatch and the result list.
        return self.driver_worker.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        return self.driver_worker.execute_model_async(scheduler_output)
