"""Server-side deadlines: a request still queued past the queue delay, or running past its own timeout, is aborted
(its KV blocks freed) and its stream ends with a clear error; the others run on."""

from __future__ import annotations

import asyncio

import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.engine.deadlines import QueueTimeoutError, RequestDeadlines, RequestTimeoutError
from tests.engine.test_async_engine import collect, greedy, model_dir, prompts, wait_idle  # noqa: F401 - fixture

# One request runs at a time: the second waits until the first (a long one) ends.
ENGINE_KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=256, max_model_len=256, max_num_seqs=1)


def metric_value(engine: AsyncEngine, name: str, **labels: str) -> float:
    return sum(m.value for m in engine.get_metrics() if m.name == name and labels.items() <= m.labels.items())


def test_deadlines_expire_in_order_and_skip_started_and_ended_requests():
    deadlines = RequestDeadlines(max_queue_delay_s=1.0)
    for request_id in ("started", "queued", "ended"):
        deadlines.add(request_id, now=0.0)
    deadlines.add("slow", now=0.0, timeout_s=0.5)
    deadlines.discard("ended")
    assert deadlines.expired(0.4, has_first_token=lambda rid: False) == []
    [(request_id, error)] = deadlines.expired(0.6, has_first_token=lambda rid: False)
    assert request_id == "slow" and isinstance(error, RequestTimeoutError)
    expired = deadlines.expired(1.1, has_first_token=lambda rid: rid == "started")
    assert [(rid, type(err)) for rid, err in expired] == [("queued", QueueTimeoutError)]
    assert deadlines.num_expired == {"queue_timeout": 1, "request_timeout": 1}


@pytest.mark.parametrize("core_process", [False, True], ids=["in-process", "core-process"])
def test_queued_past_the_delay_is_dropped_and_frees_its_blocks(model_dir, core_process):
    args = EngineArgs(model=model_dir, skip_tokenizer_init=True, **ENGINE_KWARGS)
    engine = AsyncEngine.from_engine_args(args, core_process=core_process, max_queue_delay_s=0.05)
    try:
        async def run() -> list:
            long = collect(engine, prompts(1)[0], greedy(200), "long")
            queued = [collect(engine, prompt, greedy(8), f"queued-{i}") for i, prompt in enumerate(prompts(3))]
            return await asyncio.gather(long, *queued, return_exceptions=True)

        results = asyncio.run(run())
        assert len(results[0]) == 200  # the one that got the place runs to its end
        assert all(isinstance(result, QueueTimeoutError) for result in results[1:]), results[1:]
        assert "--max-queue-delay-ms" in str(results[1])
        wait_idle(engine)
        assert metric_value(engine, "pagedllm:request_rejected_total", reason="queue_timeout") == 3
    finally:
        engine.shutdown()


def test_request_past_its_timeout_is_aborted(model_dir):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=model_dir, skip_tokenizer_init=True, **ENGINE_KWARGS))
    try:
        async def run() -> None:
            with pytest.raises(RequestTimeoutError):
                async for _ in engine.generate(prompts(1)[0], greedy(200), "slow", timeout_s=0.1):
                    pass
            assert len(await collect(engine, prompts(1)[0], greedy(4), "next")) == 4  # the engine serves on

        asyncio.run(run())
        wait_idle(engine)
        assert metric_value(engine, "pagedllm:request_rejected_total", reason="request_timeout") == 1
    finally:
        engine.shutdown()
