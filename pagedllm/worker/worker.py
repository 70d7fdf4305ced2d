"""One worker per device: it owns that device's ``ModelRunner`` and answers the executor's calls.

Today there is one worker in the engine's own process; tensor and pipeline parallelism add one per rank (a process
each, or a Ray actor), all reached through the same few calls, which take and return plain data.
"""

from __future__ import annotations

from pagedllm.config import EngineConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.step_output import StepOutput


class Worker:
    """The model, KV cache and sampler of one device (``rank`` of the engine's workers)."""

    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.rank = rank
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

    def startup_info(self) -> dict:
        """What start-up cost on this worker (seconds per phase), whether decode replays CUDA graphs, and the bytes
        of the model's weights as stored."""
        runner = self.model_runner
        return {"cuda_graphs": runner.use_cuda_graphs, "seconds": dict(runner.startup_seconds),
                "weight_bytes": runner.weight_bytes}
