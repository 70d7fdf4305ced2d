"""The Executor seam: every worker gets the same calls, the engine gets one answer (the driver's), and the KV cache
is sized by the smallest worker budget."""

from __future__ import annotations

from typing import Any

from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.executor import Executor


class RecordingWorker:
    """Stands in for a ``Worker``: records its calls, answers with its own numbers."""

    def __init__(self, rank: int, num_blocks: int) -> None:
        self.rank = rank
        self.num_blocks = num_blocks
        self.calls: list[tuple[str, tuple]] = []

    def determine_num_blocks(self) -> int:
        self.calls.append(("determine_num_blocks", ()))
        return self.num_blocks

    def num_cpu_blocks(self) -> int:
        return 10 * self.rank

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.calls.append(("initialize_kv_cache", (num_blocks,)))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.calls.append(("execute_model", (scheduler_output,)))
        return ModelRunnerOutput({f"req-from-rank-{self.rank}": self.rank})


class ManyWorkersExecutor(Executor):
    def __init__(self, workers: list[RecordingWorker]) -> None:
        self.workers = workers

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(worker, method)(*args) for worker in self.workers]


def test_every_worker_gets_the_same_calls_and_the_driver_answers() -> None:
    workers = [RecordingWorker(0, 900), RecordingWorker(1, 700), RecordingWorker(2, 800)]
    executor = ManyWorkersExecutor(workers)
    num_blocks = executor.determine_num_blocks()
    executor.initialize_kv_cache(num_blocks)
    step = SchedulerOutput([], [], {}, 0)
    output = executor.execute_model(step)

    assert num_blocks == 700  # the smallest budget: every worker must hold the same blocks
    assert executor.num_cpu_blocks() == 0
    assert output.sampled_token_ids == {"req-from-rank-0": 0}
    for worker in workers:
        assert worker.calls == [("determine_num_blocks", ()), ("initialize_kv_cache", (700,)), ("execute_model", (step,))]
        assert worker.calls[-1][1][0] is step
