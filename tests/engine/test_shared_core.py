"""One engine core shared by several front ends (``serve --api-server-count N``): each front end attaches to the
core the parent started; the same request ids on both come back to their own sender with the tokens one front end
gets alone; the core's death fails every front end's streams within seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError
from pagedllm.engine.frontend import start_shared_core
from pagedllm.params import RequestOutputKind, SamplingParams
from tests.engine.test_core_process import ENGINE_KWARGS, make_engine, run_cases

pytestmark = pytest.mark.slow  # a core process and three engines start


@pytest.fixture(scope="module")
def model_dir(tokenized_llama_dir: str) -> str:
    return tokenized_llama_dir


def test_two_front_ends_share_one_core(model_dir):
    alone = make_engine(model_dir, core_process=False)
    try:
        reference = asyncio.run(run_cases(alone))
    finally:
        alone.shutdown()
    config = EngineArgs(model=model_dir, **ENGINE_KWARGS).create_engine_config()
    spawner, config = start_shared_core(config, num_front_ends=2)
    front_ends = [AsyncEngine(config, attachment=attachment) for attachment in spawner.attachments()]
    try:
        async def both():  # the same request ids from both front ends at once
            return await asyncio.gather(*(run_cases(engine) for engine in front_ends))

        assert asyncio.run(both()) == [reference, reference]
        _kill_core_while_both_stream(spawner.process.pid, front_ends)
    finally:
        for engine in front_ends:
            engine.shutdown()
        spawner.shutdown()


def _kill_core_while_both_stream(core_pid: int, front_ends: list[AsyncEngine]) -> None:
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    killed_at = []

    async def stream(engine: AsyncEngine, index: int) -> BaseException | None:
        try:
            async for _ in engine.generate("Stream", params, "s"):
                if index == 0 and not killed_at:
                    os.kill(core_pid, signal.SIGKILL)
                    killed_at.append(time.monotonic())
        except EngineDeadError as exc:
            return exc
        return None

    async def run_all():
        return await asyncio.gather(*(stream(engine, index) for index, engine in enumerate(front_ends)))

    errors = asyncio.run(run_all())
    assert all(isinstance(error, EngineDeadError) and "died" in str(error) for error in errors), errors
    assert time.monotonic() - killed_at[0] < 10
    assert all(engine.core_died and not engine.is_healthy() for engine in front_ends)
