"""The Ray executor (``distributed_executor_backend="ray"``): one worker per rank as a Ray actor, the actors placed
by a placement group (one bundle per rank: a GPU each on CUDA, a CPU each on CPU), so ranks may span nodes.

Connect to a running cluster (``ray start --head`` on one node, ``ray start --address=<head>:6379`` on the others,
then run pagedllm on the head with ``RAY_ADDRESS`` set or in a process already ``ray.init``-ed); without one,
``ray.init()`` starts a local cluster. The process group's rendezvous is rank 0's node (its IP, a free port there).

A step's ``SchedulerOutput`` is put in the object store once and every actor reads the same object; the executor
returns the output rank's answer. A dead actor (``RayActorError``) fails the executor like a dead worker process.
"""

from __future__ import annotations

import logging
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.executor import Executor, WorkerDiedError
from pagedllm.worker.step_output import StepOutput

logger = logging.getLogger(__name__)

_PLACEMENT_TIMEOUT_S = 300.0


class RayWorkerWrapper:
    """The actor: builds its ``Worker`` on request (after the rendezvous address is known) and answers calls."""

    def __init__(self) -> None:
        self.worker = None

    def node_ip_and_free_port(self) -> tuple[str, int]:
        import ray

        from pagedllm.distributed.parallel_state import free_port

        return ray.util.get_node_ip_address(), free_port()

    def init_worker(self, config: EngineConfig, rank: int, init_method: str) -> None:
        from pagedllm.worker.worker import Worker

        local_rank = 0 if config.device.startswith("cuda") else None  # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.worker = Worker(config, rank, init_method, local_rank=local_rank)

    def execute(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


class RayExecutor(Executor):
    """Workers as Ray actors in a placement group (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as exc:
            raise ImportError("distributed_executor_backend='ray' needs Ray: pip install ray") from exc
        self._ray = ray
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        parallel = config.parallel_config
        self.world_size = parallel.world_size
        self.output_rank = (parallel.pipeline_parallel_size - 1) * parallel.tensor_parallel_size
        on_gpu = config.device.startswith("cuda")
        bundle = {"GPU": 1.0, "CPU": 1.0} if on_gpu else {"CPU": 1.0}
        self.placement_group = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.placement_group)
            raise RuntimeError(f"Ray could not place {self.world_size} workers ({bundle} each) within "
                               f"{_PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {ray.cluster_resources()}")
        actor_class = ray.remote(RayWorkerWrapper)
        self.actors = [
            actor_class.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
            ).remote()
            for rank in range(self.world_size)
        ]
        try:
            ip, port = ray.get(self.actors[0].node_ip_and_free_port.remote())
            init_method = f"tcp://{ip}:{port}"
            self._get([actor.init_worker.remote(config, rank, init_method) for rank, actor in enumerate(self.actors)],
                      "start-up")
        except BaseException:
            self.shutdown()
            raise

    def _get(self, refs: list, during: str) -> list[Any]:
        ray = self._ray
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            self.failure = f"A Ray worker actor died during {during}: {exc}"
            logger.error("%s", self.failure)
            raise WorkerDiedError(self.failure) from None
        except ray.exceptions.RayTaskError as exc:
            raise RuntimeError(f"A worker failed during {during}: {exc.cause!r}") from None

    def _launch(self, method: str, *args: Any) -> list:
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        args = tuple(self._ray.put(arg) for arg in args)  # one copy in the object store for every actor
        return [actor.execute.remote(method, *args) for actor in self.actors]

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return self._get(self._launch(method, *args), method)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        return _RayStep(self, self._launch("execute_model", scheduler_output))

    def startup_info(self) -> dict:
        infos = self.collective_rpc("startup_info")
        info = dict(infos[self.output_rank])
        info["weight_bytes"] = max(i["weight_bytes"] for i in infos)
        return info

    def shutdown(self) -> None:
        ray = self._ray
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 (already gone)
                pass
        self.actors = []
        if getattr(self, "placement_group", None) is not None:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001
                pass
            self.placement_group = None


class _RayStep:
    """A launched step: ``result()`` waits for every actor (a failure on any rank is the step's) and returns the
    output rank's answer."""

    def __init__(self, executor: RayExecutor, refs: list) -> None:
        self.executor, self.refs = executor, refs
        self._output: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            self._output = self.executor._get(self.refs, "a step")[self.executor.output_rank]
        return self._output
