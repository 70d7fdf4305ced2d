"""A step that raises fails only the request that causes it: the quarantine finds it by bisection, the others finish
with the outputs of a clean run, no KV block leaks, and no block the failed step wrote stays in the prefix cache."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.engine import LLMEngine
from pagedllm.params import RequestOutput, RequestOutputKind, SamplingParams
from pagedllm.worker.model_runner import ModelRunner
from tests.utils import build_tiny_model

ENGINE_KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=64, max_model_len=96, max_num_seqs=8,
                     skip_tokenizer_init=True)
POISON_SEED = 666  # marks a request whose presence makes the step raise
SHARED_PREFIX = [3, 5, 7, 11, 13, 17, 19, 23]  # two full blocks every prompt starts with: prefix caching engages


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("isolation"), "qwen3")


def make_engine(model_dir: str) -> LLMEngine:
    return LLMEngine(EngineArgs(model=model_dir, **ENGINE_KWARGS).create_engine_config())


class StepPoison:
    """Makes the runner's step raise mid-way (after the forward wrote KV, before sampling) when ``fails(step's
    params)`` says so, first overwriting every KV block the step wrote with NaN: KV a failed step wrote is garbage."""

    def __init__(self, runner: ModelRunner, fails: Callable[[list[SamplingParams]], bool]) -> None:
        self.runner = runner
        self.fails = fails
        self.num_failures = 0
        self.garbage_blocks: set[int] = set()  # blocks the last failed step wrote
        self._step_ids: list[str] = []
        execute_model, sample = runner.execute_model_async, runner._sample

        def execute_model_recording_ids(scheduler_output):
            self._step_ids = list(scheduler_output.num_scheduled_tokens)
            return execute_model(scheduler_output)

        def sample_or_fail(hidden, inputs):
            if self.fails([runner.requests[request_id].sampling_params for request_id in self._step_ids]):
                self._write_garbage(inputs.num_tokens)
                raise OverflowError("Python int too large to convert to C long")
            return sample(hidden, inputs)

        runner.execute_model_async = execute_model_recording_ids
        runner._sample = sample_or_fail

    def _write_garbage(self, num_tokens: int) -> None:
        slots = self.runner.buffers.slot_mapping.np[:num_tokens]
        self.garbage_blocks = {int(slot) // self.runner.block_size for slot in slots}
        for kv_cache in self.runner.kv_caches:
            kv_cache[:, sorted(self.garbage_blocks)] = math.nan
        self.num_failures += 1


def has_poison_seed(params_list: list[SamplingParams]) -> bool:
    return any(params.seed == POISON_SEED for params in params_list)


def prompts(num: int) -> list[list[int]]:
    return [SHARED_PREFIX + [29 + i, 31 + 2 * i, 37 + i % 3] * (1 + i % 3) for i in range(num)]


def greedy(seed: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, seed=seed,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
        poison: StepPoison | None = None, on_step: Callable[[LLMEngine], None] | None = None
        ) -> dict[str, RequestOutput]:
    """Run the requests to the end, checking the pool after every step and, after a failed step, that none of the
    blocks it wrote can be found in the prefix cache."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    results: dict[str, RequestOutput] = {}
    pool = engine.engine_core.scheduler.kv_cache_manager.pool
    while engine.has_unfinished_requests():
        failures_before = poison.num_failures if poison else 0
        for output in engine.step():
            assert output.finished
            results[output.request_id] = output
        pool.check_invariants()
        if poison and poison.num_failures > failures_before:
            cached = {block.block_id for block in pool._cached.values()}
            assert not cached & poison.garbage_blocks, "a block written by the failed step is in the prefix cache"
        if on_step:
            on_step(engine)
    assert pool.num_free_blocks == pool.num_blocks, "KV blocks leaked"
    return results


def clean_tokens(model_dir: str, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    outputs = run(make_engine(model_dir), requests)
    return {request_id: output.outputs[0].token_ids for request_id, output in outputs.items()}


def assert_only_poisoned_failed(results: dict[str, RequestOutput], clean: dict[str, list[int]],
                                poisoned: set[str]) -> None:
    for request_id, output in results.items():
        if request_id in poisoned:
            assert output.outputs[0].finish_reason == "abort"
            assert "OverflowError" in output.error
        else:
            assert output.error is None and output.outputs[0].finish_reason == "length"
            assert output.outputs[0].token_ids == clean[request_id], request_id


@pytest.mark.parametrize("num_poisoned", [1, 2])
def test_only_the_poisoned_requests_fail(model_dir, num_poisoned):
    normal = {f"ok{i}": (prompt, greedy()) for i, prompt in enumerate(prompts(6))}
    clean = clean_tokens(model_dir, normal)
    engine = make_engine(model_dir)
    poison = StepPoison(engine.engine_core.model_runner, has_poison_seed)
    poisoned = {f"bad{i}": (SHARED_PREFIX + [41 + i, 43], greedy(POISON_SEED)) for i in range(num_poisoned)}
    # Poisoned requests in the middle of the batch, so bisection has to look for them.
    requests = dict(list(normal.items())[:3]) | poisoned | dict(list(normal.items())[3:])
    results = run(engine, requests, poison)
    assert set(results) == set(requests)
    assert_only_poisoned_failed(results, clean, set(poisoned))
    assert engine.engine_core.engine_fault is None


def test_poisoned_request_arriving_mid_run_fails_alone(model_dir):
    normal = {f"ok{i}": (prompt, greedy()) for i, prompt in enumerate(prompts(7))}
    clean = clean_tokens(model_dir, normal)
    engine = make_engine(model_dir)
    poison = StepPoison(engine.engine_core.model_runner, has_poison_seed)
    added = []

    def add_poisoned_once(engine: LLMEngine) -> None:
        if not added:  # the others are decoding by now: their cached state in the runner must survive
            engine.add_request("bad", {"prompt_token_ids": [50, 51, 52]}, greedy(POISON_SEED))
            added.append(True)

    results = run(engine, normal, poison, on_step=add_poisoned_once)
    assert poison.num_failures >= 2  # the batch, then the culprit alone
    assert_only_poisoned_failed(results, clean, {"bad"})


def test_failure_without_culprit_is_an_engine_fault(model_dir):
    """Steps fail whenever two requests run together, never alone: no request is to blame, the engine reports a
    fault, and the requests still finish (one at a time) with their clean outputs."""
    normal = {f"ok{i}": (prompt, greedy()) for i, prompt in enumerate(prompts(4))}
    clean = clean_tokens(model_dir, normal)
    engine = make_engine(model_dir)
    poison = StepPoison(engine.engine_core.model_runner, lambda params_list: len(params_list) >= 2)
    faults = []
    results = run(engine, normal, poison, on_step=lambda e: faults.append(e.engine_core.engine_fault))
    assert any(fault is not None and "no culprit" in fault for fault in faults)
    for request_id, output in results.items():
        assert output.outputs[0].token_ids == clean[request_id]


def test_every_step_failing_gives_up_and_reports_a_fault(model_dir):
    engine = make_engine(model_dir)
    StepPoison(engine.engine_core.model_runner, lambda params_list: True)
    requests = {f"r{i}": (prompt, greedy()) for i, prompt in enumerate(prompts(8))}
    results = run(engine, requests)
    assert all(output.outputs[0].finish_reason == "abort" and output.error for output in results.values())
    assert any("engine fault" in output.error for output in results.values())
    assert "in a row" in engine.engine_core.engine_fault


def test_output_processing_failure_fails_that_request_alone(model_dir, monkeypatch):
    engine = make_engine(model_dir)
    requests = {f"r{i}": (prompt, greedy()) for i, prompt in enumerate(prompts(4))}
    processor = engine.output_processor
    update = processor._update_sequence

    def update_or_fail(sequence, output):
        if output.request_id == "r2":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return update(sequence, output)

    monkeypatch.setattr(processor, "_update_sequence", update_or_fail)
    results = run(engine, requests)
    assert results["r2"].outputs[0].finish_reason == "abort" and "UnicodeDecodeError" in results["r2"].error
    assert all(results[f"r{i}"].error is None and len(results[f"r{i}"].outputs[0].token_ids) == 12 for i in (0, 1, 3))
