"""The engine core in its own process: same tokens as in-process, clear errors when the core dies or cannot start,
a drained and reaped child on SIGTERM of a real server."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import threading
import time

import httpx
import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError, EngineStartupError
from pagedllm.params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from tests.entrypoints.openai.conftest import RemoteServer

ENGINE_KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=256, max_model_len=128, max_num_seqs=8)


@pytest.fixture(scope="module")
def model_dir(tokenized_llama_dir: str) -> str:
    return tokenized_llama_dir


def make_engine(model_dir: str, core_process: bool, **kwargs) -> AsyncEngine:
    args = EngineArgs(model=model_dir, **{**ENGINE_KWARGS, **kwargs})
    return AsyncEngine.from_engine_args(args, core_process=core_process)


async def run_request(engine: AsyncEngine, prompt: str, params: SamplingParams, request_id: str):
    """(texts, token ids, finish reasons) per sequence of a request's final output."""
    final = None
    async for output in engine.generate(prompt, params, request_id):
        final = output
    completions = sorted(final.outputs, key=lambda c: c.index)
    return [(c.text, list(c.token_ids), c.finish_reason) for c in completions]


CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    "seeded_n3": SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
    "stop_string": SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=["e"]),
    "structured": SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                                 structured_outputs=StructuredOutputsParams(choice=["alpha", "beta", "gamma"])),
    "delta_logprobs": SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2,
                                     output_kind=RequestOutputKind.FINAL_ONLY),
}


async def run_cases(engine: AsyncEngine) -> dict:
    names = sorted(CASES)
    results = await asyncio.gather(*(run_request(engine, f"Output {name}:", CASES[name], name) for name in names))
    return dict(zip(names, results))


@pytest.mark.slow
def test_core_process_generates_the_same_tokens_as_in_process(model_dir):
    results = {}
    for core_process in (False, True):
        engine = make_engine(model_dir, core_process)
        try:
            results[core_process] = asyncio.run(run_cases(engine))
            metrics = {m.name: m.value for m in engine.get_metrics() if not m.labels}
        finally:
            engine.shutdown()
        assert metrics["pagedllm:generation_tokens_total"] > 0  # stats travel with the outputs
    assert results[True] == results[False]
    assert results[True]["stop_string"][0][2] == "stop"
    assert results[True]["structured"][0][0] in ("alpha", "beta", "gamma")


@pytest.mark.slow
def test_abort_and_stop_strings_free_the_core(model_dir):
    """An aborted stream and a stop string found by the front end finish the sequence in the core too."""
    engine = make_engine(model_dir, core_process=True)

    async def abort_after_two() -> None:
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        stream = engine.generate("Abort me", params, "aborted")
        for _ in range(2):
            await anext(stream)
        await stream.aclose()  # aborts

    try:
        asyncio.run(abort_after_two())
        asyncio.run(run_request(engine, "Stop", CASES["stop_string"], "stopped"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            call_id = engine.engine.core_client.call_utility("num_unfinished_requests")
            if _utility_result(engine, call_id) == 0:
                return
            time.sleep(0.1)
        pytest.fail("the core still runs an aborted or stopped request")
    finally:
        engine.shutdown()


def _utility_result(engine: AsyncEngine, call_id: int):
    """Wait for a utility call's answer; read on the loop thread's behalf (the test pauses that loop: idle)."""
    results = {}
    original = engine.engine._process

    def capture(message):
        for result in message.utility_results:
            results[result.call_id] = result.result
        return original(message)

    engine.engine._process = capture
    try:
        deadline = time.monotonic() + 5
        while call_id not in results and time.monotonic() < deadline:
            time.sleep(0.02)
        return results.get(call_id)
    finally:
        engine.engine._process = original


@pytest.mark.slow
def test_core_death_fails_every_stream_within_seconds(model_dir):
    engine = make_engine(model_dir, core_process=True)
    params = SamplingParams(temperature=0, max_tokens=10_000 // 100, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)

    async def stream_until_death(index: int) -> BaseException | None:
        try:
            async for _ in engine.generate(f"Stream {index}", params, f"s{index}"):
                if index == 0 and not killed.is_set():
                    os.kill(engine.engine.core_client.process.pid, signal.SIGKILL)
                    killed.set()
                    start[0] = time.monotonic()
        except EngineDeadError as exc:
            return exc
        return None

    killed, start = threading.Event(), [0.0]

    async def run_all():
        return await asyncio.gather(*(stream_until_death(i) for i in range(4)))

    try:
        errors = asyncio.run(run_all())
        elapsed = time.monotonic() - start[0]
        assert all(isinstance(error, EngineDeadError) for error in errors), errors
        assert "died" in str(errors[0]) and "-9" in str(errors[0])
        assert elapsed < 5
        assert not engine.is_healthy() and "died" in engine.health_reason()
        assert engine.core_died
        with pytest.raises(EngineDeadError):
            asyncio.run(run_request(engine, "after", CASES["greedy"], "late"))
    finally:
        engine.shutdown()


def test_start_up_failure_in_the_child_is_one_clear_error(model_dir):
    """A KV cache too small for max_model_len: the child's reason reaches the caller, no hang, nothing left."""
    before = set(glob.glob("/tmp/pagedllm-core-*"))
    start = time.monotonic()
    with pytest.raises(EngineStartupError, match="fewer than max_model_len"):
        make_engine(model_dir, core_process=True, num_gpu_blocks_override=2)
    assert time.monotonic() - start < 60
    assert set(glob.glob("/tmp/pagedllm-core-*")) <= before


@pytest.mark.slow
def test_sigterm_drains_the_server_and_reaps_the_core(model_dir, tmp_path):
    ipc_dirs_before = set(glob.glob("/tmp/pagedllm-core-*"))
    remote = RemoteServer(model_dir, ["--device", "cpu", "--max-model-len", "128", "--graceful-shutdown-timeout", "10"],
                          tmp_path)
    try:
        children = [pid for pid in _child_pids(remote.proc.pid) if _is_engine_core(pid)]
        assert len(children) == 1, "no engine core process"
        body = {"model": model_dir, "prompt": "Drain", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=30) as client:
            response = client.post(remote.url_for("/v1/completions"), json=body)
        assert response.status_code == 200
        remote.proc.send_signal(signal.SIGTERM)
        assert remote.proc.wait(timeout=20) == 0, remote.log()
        assert _state(children[0]) == "gone"  # reaped by the server: neither running nor a zombie
        assert set(glob.glob("/tmp/pagedllm-core-*")) <= ipc_dirs_before
    finally:
        remote.terminate()


@pytest.mark.slow
def test_server_exits_non_zero_when_the_core_is_killed(model_dir, tmp_path):
    remote = RemoteServer(model_dir, ["--device", "cpu", "--max-model-len", "128"], tmp_path)
    try:
        (core_pid,) = [pid for pid in _child_pids(remote.proc.pid) if _is_engine_core(pid)]
        os.kill(core_pid, signal.SIGKILL)
        status = remote.health_until_exit(timeout=10)
        assert remote.proc.wait(timeout=10) == 1, remote.log()
        assert status in (None, 503)
        assert "died unexpectedly" in remote.log()
    finally:
        remote.terminate()


def _child_pids(pid: int) -> list[int]:
    children = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(task) as file:
            children += [int(child) for child in file.read().split()]
    return children


def _is_engine_core(pid: int) -> bool:
    """The spawned core, not multiprocessing's resource tracker (also a child of the server)."""
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        cmdline = file.read().decode(errors="replace")
    return "spawn_main" in cmdline and "resource_tracker" not in cmdline


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
