"""One worker per device: it owns that device's ``ModelRunner`` and answers the executor's calls.

One worker in the engine's own process for one device; under tensor and pipeline parallelism one per rank (a
process each, ``mp_executor.py``, or a Ray actor, ``ray_executor.py``), all reached through the same few calls, which
take and return plain data. A worker of a multi-rank engine joins the process group before it builds its model.
"""

from __future__ import annotations

from pagedllm.config import EngineConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.step_output import StepOutput


class Worker:
    """The model, KV cache and sampler of one device (``rank`` of the engine's workers)."""

    def __init__(self, config: EngineConfig, rank: int = 0, distributed_init_method: str | None = None,
                 local_rank: int | None = None) -> None:
        """``distributed_init_method`` (``tcp://host:port``): join the engine's process group as ``rank`` first
        (every rank of a multi-rank engine); ``local_rank``: this rank's device on its node (default ``rank``)."""
        self.rank = rank
        parallel = config.parallel_config
        if distributed_init_method is not None:
            from pagedllm.distributed.parallel_state import init_distributed

            if config.device.startswith("cuda"):
                import torch

                torch.cuda.set_device(rank if local_rank is None else local_rank)
            init_distributed(rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                             distributed_init_method, config.device)
        self.model_runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        """How many KV blocks this device's budget allows."""
        return self.model_runner.determine_num_blocks()

    def num_cpu_blocks(self) -> int:
        """Blocks of this worker's CPU swap pool."""
        return self.model_runner.num_cpu_blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` KV blocks (the same number on every worker) and capture CUDA graphs."""
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        """Launch the step; its output is read with ``result()`` (async scheduling)."""
        return self.model_runner.execute_model_async(scheduler_output)

    def remove_lora(self, lora_int_id: int) -> None:
        """Drop an unloaded adapter's weights (its GPU slot and CPU copy)."""
        self.model_runner.remove_lora(lora_int_id)

    def startup_info(self) -> dict:
        """What start-up cost on this worker (seconds per phase), whether decode replays CUDA graphs, and the bytes
        of the model's weights as stored."""
        runner = self.model_runner
        return {"cuda_graphs": runner.use_cuda_graphs, "seconds": dict(runner.startup_seconds),
                "weight_bytes": runner.weight_bytes, "rank": self.rank}

    def check_health(self) -> bool:
        return True

