"""AsyncEngine: concurrent streams equal offline generation, aborts free blocks, bad input fails alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError
from pagedllm.params import RequestOutputKind
from tests.utils import build_tiny_model

ENGINE_KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=48, max_model_len=96, max_num_seqs=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("async"), "qwen3")


# The engine loop with the core in its thread (synchronous and async scheduling) and in its own process.
MODES = {"in-process": dict(core_process=False), "in-process-async": dict(core_process=False, async_scheduling=True),
         "core-process": dict(core_process=True)}


@pytest.fixture(params=list(MODES))
def engine(model_dir, request):
    mode = dict(MODES[request.param])
    core_process = mode.pop("core_process")
    args = EngineArgs(model=model_dir, skip_tokenizer_init=True, **ENGINE_KWARGS, **mode)
    engine = AsyncEngine.from_engine_args(args, core_process=core_process)
    yield engine
    engine.shutdown()


def prompts(num: int) -> list[dict]:
    return [{"prompt_token_ids": [3 + i, 5, 7 + i % 5, 11] * (1 + i % 4)} for i in range(num)]


def greedy(max_tokens: int, kind=RequestOutputKind.DELTA) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind)


async def collect(engine: AsyncEngine, prompt, params, request_id) -> list[int]:
    token_ids = []
    async for output in engine.generate(prompt, params, request_id):
        token_ids += output.outputs[0].token_ids
    return token_ids


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Wait until no request runs or waits and no KV block is in use (read from the metrics: any mode)."""
    deadline = time.monotonic() + timeout
    idle = {"pagedllm:num_requests_running": 0, "pagedllm:num_requests_waiting": 0, "pagedllm:kv_cache_usage_perc": 0}
    while time.monotonic() < deadline:
        values = {m.name: m.value for m in engine.get_metrics() if m.name in idle}
        if values == idle:
            return
        time.sleep(0.05)
    pytest.fail("the engine did not go idle with every block free")


def test_concurrent_streams_equal_offline_generation(engine, model_dir):
    batch = prompts(24)

    async def run_all():
        return await asyncio.gather(*(collect(engine, p, greedy(12), f"r{i}") for i, p in enumerate(batch)))

    streamed = asyncio.run(run_all())
    offline = LLM(model_dir, skip_tokenizer_init=True, **ENGINE_KWARGS).generate(batch, greedy(12), use_tqdm=False)
    assert streamed == [o.outputs[0].token_ids for o in offline]
    wait_idle(engine)
    assert engine.is_healthy()


def test_cumulative_outputs_grow(engine):
    async def run():
        return [o async for o in engine.generate(prompts(1)[0], greedy(5, RequestOutputKind.CUMULATIVE), "c")]

    outputs = asyncio.run(run())
    # Each output holds all tokens so far (a reader that falls behind gets only the latest of those piled up).
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert len(tokens[-1]) == 5 and all(later[: len(earlier)] == earlier and len(later) > len(earlier)
                                       for earlier, later in zip(tokens, tokens[1:]))
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])


def test_consumer_that_stops_early_aborts_the_request(engine):
    async def run():
        agen = engine.generate(prompts(1)[0], greedy(80), "early")
        async for _ in agen:
            break
        await agen.aclose()

    asyncio.run(run())
    wait_idle(engine)
    metrics = engine.get_metrics()
    assert next(m.value for m in metrics if m.name == "pagedllm:num_requests_running") == 0
    aborted = next(m for m in metrics if m.name == "pagedllm:request_success_total" and m.labels["finished_reason"] == "abort")
    assert aborted.value == 1


def test_bad_request_fails_alone(engine):
    async def run():
        good = asyncio.ensure_future(collect(engine, prompts(1)[0], greedy(6), "good"))
        with pytest.raises(ValueError, match="out of vocabulary"):
            await collect(engine, {"prompt_token_ids": [10**6]}, greedy(6), "bad")
        return await good

    assert len(asyncio.run(run())) == 6
    assert engine.is_healthy()


def test_shutdown_ends_streams_and_refuses_new_work(engine):
    async def run():
        stream = engine.generate(prompts(1)[0], greedy(90), "long")
        await anext(stream)  # running now
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:  # at most the outputs of the step in flight, then the error
                pass
        with pytest.raises(EngineDeadError):
            await collect(engine, prompts(1)[0], greedy(3), "after")

    asyncio.run(run())
    assert not engine.is_healthy()


def test_priority_reaches_the_scheduler(model_dir):
    args = EngineArgs(model=model_dir, skip_tokenizer_init=True, scheduling_policy="priority",
                      **{**ENGINE_KWARGS, "max_num_seqs": 1})
    engine = AsyncEngine.from_engine_args(args)
    finished = []

    async def run_one(name: str, max_tokens: int, priority: int) -> None:
        async for _ in engine.generate(prompts(1)[0], greedy(max_tokens), name, priority=priority):
            pass
        finished.append(name)

    async def run():
        with pytest.raises(ValueError, match="priority"):
            await collect_with_priority(engine, "bad", "high")
        long_low = engine.generate(prompts(1)[0], greedy(60), "long low", priority=5)
        await anext(long_low)  # running now: the others wait (max_num_seqs=1)
        low = asyncio.ensure_future(run_one("low", 4, 5))
        await asyncio.sleep(0.05)
        high = asyncio.ensure_future(run_one("high", 4, 0))
        async for _ in long_low:
            pass
        await asyncio.gather(low, high)

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    assert finished.index("high") < finished.index("low")


async def collect_with_priority(engine: AsyncEngine, request_id: str, priority) -> None:
    async for _ in engine.generate(prompts(1)[0], greedy(2), request_id, priority=priority):
        pass
