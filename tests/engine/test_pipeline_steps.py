"""The engine loop under pipeline parallelism, with a fake executor instead of worker processes: the engine keeps
``pipeline_parallel_size`` steps launched and unanswered, a request whose sampled token is in flight is never
scheduled again (the steps in flight hold disjoint sampling requests; prefill chunks may follow each other), and the
first stage learns every token it feeds from the SchedulerOutputs alone (the carried sampled ids). The outputs equal
those of the synchronous loop of one stage. No model and no timing: counts only."""

from __future__ import annotations

from collections import deque

import pytest

import pagedllm.engine.engine as engine_module
from pagedllm.config import EngineArgs
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.core.request import Request
from pagedllm.engine.engine import EngineCore
from pagedllm.params import SamplingParams
from pagedllm.worker.executor import Executor
from pagedllm.worker.request_state import CachedRequestState


class FakeStages(Executor):
    """The stages of a pipeline without a model. The first stage's view of each request (its token ids) is built from
    the SchedulerOutputs as a real earlier stage's is (new requests' tokens, then the carried sampled ids); the last
    stage's token hashes that view, so a token the scheduler failed to carry changes the outputs. Steps are answered
    only when the engine reads them; the counters say how many were unanswered at each launch."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.is_pipelined = config.parallel_config.pipeline_parallel_size > 1
        self.first_stage: dict[str, CachedRequestState] = {}
        self.unanswered: deque[FakeStep] = deque()
        self.unanswered_at_launch: list[int] = []  # steps unanswered right after each launch (this one included)
        self.num_chunks_behind_own_chunk = 0  # prefill chunks launched while the request's previous chunk was

    def collective_rpc(self, method: str, *args):
        return [getattr(self, method)(*args)]

    def determine_num_blocks(self) -> int:
        return self.config.cache_config.num_gpu_blocks_override

    def num_cpu_blocks(self) -> int:
        return 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        pass

    def startup_info(self) -> dict:
        return {"cuda_graphs": False, "seconds": {}, "weight_bytes": 0}

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> FakeStep:
        in_flight = {req_id for step in self.unanswered for req_id in step.req_ids}
        sampling_in_flight = {req_id for step in self.unanswered for req_id in step.output.sampled_token_ids}
        scheduled = set(scheduler_output.num_scheduled_tokens)
        assert not scheduled & sampling_in_flight, "a request whose sampled token is in flight was scheduled again"
        self.num_chunks_behind_own_chunk += len(scheduled & in_flight)
        step = FakeStep(self, scheduled, ModelRunnerOutput(self._run_first_stage(scheduler_output)))
        self.unanswered.append(step)
        self.unanswered_at_launch.append(len(self.unanswered))
        return step

    def _run_first_stage(self, scheduler_output: SchedulerOutput) -> dict[str, int]:
        """Apply the diff as the runner does, check the first stage knows every token it feeds, and sample."""
        for req_id in scheduler_output.finished_req_ids:
            self.first_stage.pop(req_id, None)
        for data in scheduler_output.new_reqs:
            self.first_stage[data.req_id] = CachedRequestState.from_new(data)
        for data in scheduler_output.cached_reqs:
            state = self.first_stage[data.req_id]
            state.num_computed_tokens = data.num_computed_tokens
            if data.new_token_ids:
                state.add_carried_outputs(data.num_computed_tokens, data.new_token_ids)
        sampled = {}
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            state = self.first_stage[req_id]
            end = state.num_computed_tokens + num_new
            assert end <= len(state.token_ids), "the first stage lacks a token it must feed"
            state.num_computed_tokens = end
            if end == len(state.token_ids):
                sampled[req_id] = 1 + hash((req_id, *state.token_ids)) % 97
                if not self.is_pipelined:  # one stage: it is the last, and keeps what it samples
                    state.append_output(sampled[req_id])
        return sampled


class FakeStep:
    def __init__(self, stages: FakeStages, req_ids: set[str], output: ModelRunnerOutput) -> None:
        self.stages, self.req_ids, self.output = stages, req_ids, output

    def result(self) -> ModelRunnerOutput:
        assert self.stages.unanswered[0] is self, "steps are answered in launch order"
        self.stages.unanswered.popleft()
        return self.output


def make_core(monkeypatch, model_dir: str, pipeline_parallel_size: int, **kwargs) -> EngineCore:
    monkeypatch.setattr(engine_module, "make_executor", FakeStages)
    settings = {"device": "cpu", "skip_tokenizer_init": True, "block_size": 4, "max_model_len": 64, "max_num_seqs": 8,
                "num_gpu_blocks_override": 40, "async_scheduling": False}
    args = EngineArgs(model=model_dir, pipeline_parallel_size=pipeline_parallel_size, **{**settings, **kwargs})
    return EngineCore(args.create_engine_config())


def generate(core: EngineCore, prompts: list[list[int]], max_tokens: int = 12) -> dict[str, list[int]]:
    eos = core.config.model_config.eos_token_ids
    for index, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        core.add_request(Request(f"r{index}", prompt, params, 0, eos, max_tokens))
    tokens: dict[str, list[int]] = {f"r{index}": [] for index in range(len(prompts))}
    while core.has_unfinished_requests():
        for output in core.step():
            tokens[output.request_id] += output.new_token_ids
    return tokens


def prompts_of(lengths: list[int]) -> list[list[int]]:
    return [[(7 * index + position) % 50 + 1 for position in range(length)] for index, length in enumerate(lengths)]


@pytest.mark.parametrize("pipeline_parallel_size", [2, 3])
def test_pp_steps_in_flight_hold_disjoint_decodes(monkeypatch, tiny_model_dir, pipeline_parallel_size):
    prompts = prompts_of([5, 9, 3, 7, 6, 4])
    reference_core = make_core(monkeypatch, tiny_model_dir("llama"), 1)
    reference = generate(reference_core, prompts)
    assert set(reference_core.executor.unanswered_at_launch) == {1}  # synchronous: one step at a time

    core = make_core(monkeypatch, tiny_model_dir("llama"), pipeline_parallel_size)
    assert core.max_steps_in_flight == pipeline_parallel_size
    assert generate(core, prompts) == reference
    launches = core.executor.unanswered_at_launch
    assert max(launches) == pipeline_parallel_size
    # After the first prefill, the six decoding requests split into one group per stage: nearly every step is
    # launched with the pipeline full (the last ones drain it).
    assert launches.count(pipeline_parallel_size) >= len(launches) - 2 * pipeline_parallel_size, launches
    assert len(launches) >= len(reference_core.executor.unanswered_at_launch)  # smaller steps, more of them


def test_pp_prefill_chunks_follow_each_other(monkeypatch, tiny_model_dir):
    """Chunks of one long prompt go into consecutive steps in flight (they sample nothing until the last)."""
    prompts = prompts_of([30, 3])
    reference = generate(make_core(monkeypatch, tiny_model_dir("llama"), 1, max_num_batched_tokens=8), prompts)
    core = make_core(monkeypatch, tiny_model_dir("llama"), 2, max_num_batched_tokens=8)
    assert generate(core, prompts) == reference
    assert core.executor.num_chunks_behind_own_chunk >= 3


def test_pp_preemption_keeps_the_outputs(monkeypatch, tiny_model_dir):
    """Few KV blocks: requests in flight are preempted (their token still coming) and recomputed later."""
    prompts = prompts_of([10, 12, 9, 11, 10, 12])
    kwargs = {"max_num_batched_tokens": 16, "num_gpu_blocks_override": 24}
    reference_core = make_core(monkeypatch, tiny_model_dir("llama"), 1, **kwargs)
    reference = generate(reference_core, prompts, max_tokens=20)
    core = make_core(monkeypatch, tiny_model_dir("llama"), 2, **kwargs)
    assert generate(core, prompts, max_tokens=20) == reference
    assert core.scheduler.num_preemptions_total > 0
    pool = core.scheduler.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks
