"""The server's early grammar check with the engine core in its own process: one compile pool (the core's), the
manager's exception types rebuilt in the front end, compile workers started ahead for serving and killed at
shutdown in both modes, stale socket directories removed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.engine.contracts import MessageCodec
from pagedllm.engine.core_client import remove_stale_socket_dirs
from pagedllm.engine.grammar_calls import CoreGrammarPreparer, PendingGrammarCalls
from pagedllm.params import SamplingParams, StructuredOutputsParams
from pagedllm.structured_output.compile_pool import CompileTimeout, GrammarCompileAbandoned
from pagedllm.structured_output.manager import GrammarQueueFull

CHOICE = StructuredOutputsParams(choice=["yes", "no"])


# ---- the round trip, without processes ----------------------------------------------------------------------------


class FakeManager:
    """``prepare`` returns futures the test settles, or raises what the test says."""

    def __init__(self) -> None:
        self.futures: list[concurrent.futures.Future] = []
        self.raise_now: BaseException | None = None
        self.calls: list[tuple[StructuredOutputsParams, str | None]] = []

    def prepare(self, spec, client_id=None) -> concurrent.futures.Future:
        self.calls.append((spec, client_id))
        if self.raise_now is not None:
            raise self.raise_now
        self.futures.append(concurrent.futures.Future())
        return self.futures[-1]


class RoundTrip:
    """A front end's preparer wired to a core's pending calls through the real codec, as the processes are."""

    def __init__(self, config) -> None:
        self.manager = FakeManager()
        self.codec = MessageCodec()
        self.num_wakes = 0
        self.core = PendingGrammarCalls(self._wake)
        self.front = CoreGrammarPreparer(config, self._deliver)

    def _wake(self) -> None:
        self.num_wakes += 1

    def _deliver(self, data: bytes) -> None:
        self.core.start(self.codec.decode_front_to_core(data), lambda: self.manager)

    def answer(self) -> None:
        """The core's next output message, through the codec, to the front end."""
        from pagedllm.engine.contracts import EngineCoreOutputs

        message = EngineCoreOutputs([], 0.0, grammar_results=self.core.take_answers())
        self.front.resolve(self.codec.decode_core_to_front(self.codec.encode(message)).grammar_results)


@pytest.fixture
def trip() -> RoundTrip:
    # The preparer reads only the compile deadline of the engine's config.
    return RoundTrip(SimpleNamespace(structured_outputs_config=SimpleNamespace(compile_timeout_s=7.0)))


def test_a_compiled_spec_resolves_the_front_end_future(trip):
    future = trip.front.prepare(CHOICE, client_id="10.0.0.1")
    assert trip.manager.calls == [(CHOICE, "10.0.0.1")] and not future.done()
    trip.answer()
    assert not future.done()  # the core answers only once the compile has finished
    trip.manager.futures[0].set_result(object())
    assert trip.num_wakes == 1  # the finished compile woke the core's loop
    trip.answer()
    assert future.result(timeout=0) is None and trip.front.num_pending == 0 and trip.core.num_pending == 0


@pytest.mark.parametrize("raised, expected", [
    (ValueError("structured_outputs.regex is invalid"), ValueError),
    (CompileTimeout("structured_outputs.json: the grammar took longer than 7 s to compile"), ValueError),
    (GrammarCompileAbandoned("the server is stopping"), GrammarCompileAbandoned),
    (KeyError("bug"), RuntimeError),
])
def test_a_failed_compile_raises_the_same_type_in_the_front_end(trip, raised, expected):
    future = trip.front.prepare(CHOICE)
    trip.manager.futures[0].set_exception(raised)
    trip.answer()
    with pytest.raises(expected) as info:
        future.result(timeout=0)
    assert str(raised) in str(info.value)


def test_a_full_queue_is_answered_without_a_compile(trip):
    trip.manager.raise_now = GrammarQueueFull("too many structured output grammars compiling for this client")
    future = trip.front.prepare(CHOICE, client_id="c")
    trip.answer()
    with pytest.raises(GrammarQueueFull, match="too many"):
        future.result(timeout=0)


def test_the_front_end_surface_matches_the_managers(trip):
    from pagedllm.structured_output.compile_pool import CompilePool

    assert trip.front.compile_timeout_s == 7.0
    assert trip.front.max_wait_s == CompilePool.max_wait_s(7.0)


def test_abandoning_fails_pending_and_later_calls(trip):
    pending = trip.front.prepare(CHOICE)
    trip.front.abandon_all("The engine core process died unexpectedly")
    with pytest.raises(GrammarCompileAbandoned, match="died"):
        pending.result(timeout=0)
    with pytest.raises(GrammarCompileAbandoned):
        trip.front.prepare(CHOICE)


# ---- stale socket directories -------------------------------------------------------------------------------------


def test_only_our_socket_dirs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"pagedllm-core-{dead.pid}-abc123"
    live = tmp_path / f"pagedllm-core-{os.getpid()}-def456"
    unrelated = [tmp_path / "pagedllm-core-notapid", tmp_path / f"other-{dead.pid}-x"]
    for path in (stale, live, *unrelated):
        path.mkdir()
        (path / "input").write_text("")
    link = tmp_path / f"pagedllm-core-{dead.pid}-link"
    link.symlink_to(live)  # never followed nor removed
    assert remove_stale_socket_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and all(path.exists() for path in unrelated) and link.is_symlink()


# ---- real processes -------------------------------------------------------------------------------------------------

ENGINE_KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=256, max_model_len=128, max_num_seqs=8)


@pytest.fixture(scope="module")
def model_dir(tokenized_llama_dir: str) -> str:
    return tokenized_llama_dir


def compile_workers() -> dict[int, int]:
    """Every grammar compile worker process on this machine: pid -> parent pid."""
    workers = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and "compile_pool import worker_main" in _cmdline(int(entry)):
            workers[int(entry)] = _parent_pid(int(entry))
    return {pid: ppid for pid, ppid in workers.items() if ppid is not None}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return int(file.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_for(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def workers_of(pid: int) -> list[int]:
    return [worker for worker, parent in compile_workers().items() if parent == pid]


def make_engine(model_dir: str, core_process: bool, **kwargs) -> AsyncEngine:
    return AsyncEngine.from_engine_args(EngineArgs(model=model_dir, **ENGINE_KWARGS, **kwargs),
                                        core_process=core_process, warm_up_grammars=True)


async def generate_text(engine: AsyncEngine, params: SamplingParams) -> str:
    final = None
    async for output in engine.generate("Answer:", params, "constrained"):
        final = output
    return final.outputs[0].text


@pytest.mark.slow
def test_one_pool_in_the_core_process_warm_before_any_request(model_dir):
    # Offline engines of earlier tests in this pytest process may have compile workers of their own.
    earlier_workers = set(workers_of(os.getpid()))
    engine = make_engine(model_dir, core_process=True)
    core_pid = engine.engine.core_client.process.pid
    try:
        assert type(engine.structured_output_manager) is CoreGrammarPreparer  # no manager, no pool here
        assert wait_for(lambda: len(workers_of(core_pid)) == 3), "the core did not start its workers ahead"  # + spare
        assert set(workers_of(os.getpid())) <= earlier_workers  # none started here

        async def scenario():
            await asyncio.wrap_future(engine.structured_output_manager.prepare(CHOICE, client_id="a"))
            with pytest.raises(ValueError, match="regex"):
                await asyncio.wrap_future(engine.structured_output_manager.prepare(
                    StructuredOutputsParams(regex="(unclosed"), client_id="a"))
            params = SamplingParams(temperature=1.0, seed=1, max_tokens=20, structured_outputs=CHOICE)
            return await generate_text(engine, params)

        assert asyncio.run(scenario()) in ("yes", "no")
        assert set(workers_of(os.getpid())) <= earlier_workers  # compiled once, in the core
        # (a worker may be mid-replacement by the spare for a moment: wait for the resting size)
        assert wait_for(lambda: len(workers_of(core_pid)) == 3)
    finally:
        engine.shutdown()
    assert wait_for(lambda: not workers_of(core_pid), 10.0), "compile workers outlived the core"


@pytest.mark.slow
def test_the_per_client_limit_is_the_cores(model_dir):
    engine = make_engine(model_dir, core_process=True, max_pending_grammars_per_client=1)
    try:
        from tests.structured_output.slow_grammars import slow_json_schema

        manager = engine.structured_output_manager
        slow = manager.prepare(StructuredOutputsParams(json=slow_json_schema("limit")), client_id="greedy")
        second = manager.prepare(StructuredOutputsParams(json=slow_json_schema("limit2")), client_id="greedy")
        with pytest.raises(GrammarQueueFull):
            second.result(timeout=30)
        other_client = manager.prepare(CHOICE, client_id="other")
        assert other_client.result(timeout=60) is None
        engine.shutdown()
        with pytest.raises(GrammarCompileAbandoned):  # still compiling when the engine stopped: a 503
            slow.result(timeout=5)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_in_process_shutdown_kills_the_compile_workers(model_dir):
    others = set(workers_of(os.getpid()))  # other tests' pools in this process, if any

    def own_workers() -> set[int]:
        return set(workers_of(os.getpid())) - others

    engine = make_engine(model_dir, core_process=False)
    try:
        assert wait_for(lambda: len(own_workers()) == 3), "the workers were not started ahead"  # two and the spare
        assert engine.structured_output_manager.prepare(CHOICE).result(timeout=60) is not None
    finally:
        engine.shutdown()
    assert wait_for(lambda: not own_workers(), 5.0), "compile workers outlived the engine"
