"""A worker process killed mid-generation fails the requests in flight with an error, the engine reports a fault,
and nothing hangs (every wait of the multiprocess executor is bounded by the workers' sentinels)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pagedllm import LLM, SamplingParams
from tests.distributed.conftest import ENGINE_KWARGS, PROMPTS


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2},
                                      {"pipeline_parallel_size": 2}])  # the last stage dies, two steps in flight
def test_killed_worker_fails_requests_and_marks_the_engine_faulty(tiny_model_dir, parallel):
    llm = LLM(tiny_model_dir("llama"), **{**ENGINE_KWARGS, "max_model_len": 256}, **parallel)
    engine = llm.llm_engine
    executor = engine.engine_core.executor
    processes = list(executor.processes)
    try:
        victim = executor.processes[1]
        # Long generations, so the kill lands while they run.
        killer = threading.Timer(1.0, os.kill, (victim.pid, signal.SIGKILL))
        killer.start()
        start = time.monotonic()
        params = SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)
        try:
            outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 (a raised error is a clean failure too)
            assert "worker" in str(exc).lower()
        else:
            assert all(o.finished for o in outputs)
            assert any(o.outputs[0].finish_reason == "abort" for o in outputs)
        killer.join()
        assert time.monotonic() - start < 60
        assert executor.failure is not None
        assert "worker" in engine.engine_fault
    finally:
        engine.engine_core.shutdown()
    assert not any(p.is_alive() for p in processes)
