"""AsyncEngine: a failed request's stream raises RequestFailedError alone; health, readiness, draining and shutdown
answer from flags, at once, whatever the engine thread is doing."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from pagedllm.params import RequestOutputKind, SamplingParams
from tests.engine.test_failure_isolation import ENGINE_KWARGS, POISON_SEED, StepPoison, has_poison_seed, prompts
from tests.utils import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("health"), "qwen3")


@pytest.fixture
def engine(model_dir):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=model_dir, **ENGINE_KWARGS), health_stall_timeout_s=0.5)
    yield engine
    engine.shutdown()


def greedy(seed: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, seed=seed, output_kind=RequestOutputKind.DELTA)


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, request_id: str) -> list[int]:
    token_ids = []
    async for output in engine.generate({"prompt_token_ids": prompt}, params, request_id):
        token_ids += output.outputs[0].token_ids
    return token_ids


async def collect_all(engine: AsyncEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    results = await asyncio.gather(
        *(collect(engine, prompt, params, request_id) for request_id, (prompt, params) in requests.items()),
        return_exceptions=True,
    )
    return dict(zip(requests, results))


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_poisoned_stream_raises_request_failed_while_others_complete(engine):
    normal = {f"ok{i}": (prompt, greedy()) for i, prompt in enumerate(prompts(6))}
    clean = asyncio.run(collect_all(engine, normal))
    StepPoison(engine.engine.engine_core.model_runner, has_poison_seed)
    results = asyncio.run(collect_all(engine, {**normal, "bad": ([60, 61, 62, 63], greedy(POISON_SEED))}))
    assert isinstance(results["bad"], RequestFailedError) and "OverflowError" in str(results["bad"])
    assert {request_id: results[request_id] for request_id in normal} == clean
    assert engine.is_healthy() and engine.health_reason() is None


def test_steps_failing_with_no_culprit_turn_health_off_until_a_step_succeeds(engine):
    runner = engine.engine.engine_core.model_runner
    sample, execute_model = runner._sample, runner.execute_model_async
    StepPoison(runner, lambda params_list: True)
    requests = {f"r{i}": (prompt, greedy()) for i, prompt in enumerate(prompts(8))}
    results = asyncio.run(collect_all(engine, requests))
    assert all(isinstance(result, RequestFailedError) for result in results.values())
    assert not engine.is_healthy() and engine.health_reason().startswith("engine fault")
    runner._sample, runner.execute_model_async = sample, execute_model  # the fault goes away
    asyncio.run(collect_all(engine, {"after": ([5, 6, 7], greedy())}))
    assert engine.is_healthy()


def test_stuck_step_turns_health_off_and_shutdown_stays_bounded(engine):
    runner = engine.engine.engine_core.model_runner
    execute_model, release = runner.execute_model_async, threading.Event()

    def stuck_execute_model(scheduler_output):
        release.wait(30)
        return execute_model(scheduler_output)

    runner.execute_model_async = stuck_execute_model

    async def stream_until_shutdown() -> BaseException | None:
        task = asyncio.ensure_future(collect(engine, [5, 6, 7], greedy(), "stuck"))
        await asyncio.sleep(0)
        assert await asyncio.to_thread(wait_until, lambda: not engine.is_healthy())
        assert "no progress" in engine.health_reason()
        started = time.monotonic()
        await asyncio.to_thread(engine.shutdown, 0.5)
        assert time.monotonic() - started < 5.0  # 10x the timeout: the stuck step is not waited for
        try:
            await asyncio.wait_for(task, 5.0)
        except BaseException as exc:  # noqa: BLE001 - the error is the result
            return exc
        return None

    try:
        error = asyncio.run(stream_until_shutdown())
    finally:
        release.set()
    assert isinstance(error, EngineDeadError)
    assert not engine.is_ready() and not engine.is_healthy()


def test_draining_refuses_new_requests_and_finishes_those_in_flight(engine):
    assert engine.is_ready()

    async def drain() -> list[int]:
        task = asyncio.ensure_future(collect(engine, [5, 6, 7], greedy(), "in-flight"))
        await asyncio.sleep(0.05)
        engine.begin_draining()
        with pytest.raises(EngineDeadError):
            await collect(engine, [8, 9], greedy(), "late")
        return await task

    assert len(asyncio.run(drain())) == 10
    assert not engine.is_ready() and engine.is_healthy()


def test_health_stall_timeout_must_be_positive(model_dir):
    with pytest.raises(ValueError, match="health_stall_timeout_s"):
        AsyncEngine.from_engine_args(EngineArgs(model=model_dir, **ENGINE_KWARGS), health_stall_timeout_s=0)
