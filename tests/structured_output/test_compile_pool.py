"""Grammar compilation in worker processes: a compile past its deadline fails only its own spec (its worker is killed
and replaced) while cheap grammars compile meanwhile; the asyncio loop of the process stays responsive; a client's
pending compiles are bounded; the cache is an LRU bounded by bytes; shutdown abandons compiles at once; a spec
nested too deeply is a ValueError. Uses the genuinely slow grammar of ``slow_grammars`` with short deadlines."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from transformers import AutoTokenizer

from pagedllm.params import StructuredOutputsParams
from pagedllm.structured_output.compile_pool import WORKER_NICENESS, CompilePool, GrammarCompileAbandoned, _compile_one
from pagedllm.structured_output.manager import GrammarQueueFull, StructuredOutputManager
from tests.structured_output.slow_grammars import FAST_JSON_SCHEMA, slow_json_schema, slow_json_schema_text

DEADLINE_S = 1.5


def _slow(tag: str) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=slow_json_schema(tag))


@pytest.fixture(scope="module")
def tokenizer(so_model_dir: str):
    return AutoTokenizer.from_pretrained(so_model_dir)


@pytest.fixture(scope="module")
def manager(tokenizer):
    manager = StructuredOutputManager(tokenizer, 320, [tokenizer.eos_token_id], compile_timeout_s=DEADLINE_S,
                                      max_pending_per_client=2)
    manager.prepare(StructuredOutputsParams(json_object=True)).result(timeout=120)  # workers started
    yield manager
    manager.shutdown()


@pytest.mark.slow
def test_slow_grammar_is_killed_at_its_deadline_while_a_cheap_one_compiles(manager):
    pids_before = manager.pool.worker_pids()
    start = time.monotonic()
    slow = manager.prepare(_slow("killed"))
    fast = manager.prepare(StructuredOutputsParams(json=FAST_JSON_SCHEMA))
    assert fast.result(timeout=30) is not None
    assert time.monotonic() - start < DEADLINE_S  # not queued behind the slow one
    with pytest.raises(ValueError, match=f"longer than {DEADLINE_S:g} s to compile"):
        slow.result(timeout=30)
    assert time.monotonic() - start < DEADLINE_S + 1.0
    assert len(set(pids_before) - set(manager.pool.worker_pids())) == 1  # its worker was killed...
    assert wait_for(lambda: len(set(manager.pool.worker_pids()) - set(pids_before)) == 1)  # ...and replaced
    # The failure is remembered for a while: the same spec fails at once instead of taking a worker again.
    with pytest.raises(ValueError, match="to compile"):
        manager.prepare(_slow("killed")).result(timeout=1)


def wait_for(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    return condition()


def wait_ready(pool: CompilePool, count: int) -> None:
    assert wait_for(lambda: len(pool.ready_worker_pids()) >= count, 120), "the workers did not get ready"


def test_ready_workers_yield_the_cpu(manager):
    wait_ready(manager.pool, 3)  # two workers and the warm spare
    for pid in manager.pool.ready_worker_pids():
        assert os.getpriority(os.PRIO_PROCESS, pid) == WORKER_NICENESS


@pytest.mark.slow
def test_a_cheap_grammar_takes_the_spare_while_every_worker_compiles_a_slow_one(tokenizer):
    manager = StructuredOutputManager(tokenizer, 320, [tokenizer.eos_token_id], compile_timeout_s=8)
    try:
        wait_ready(manager.pool, 3)
        slow = [manager.prepare(_slow(f"busy{i}"), client_id=f"slow{i}") for i in range(2)]
        time.sleep(0.3)  # both workers compiling
        assert manager.prepare(StructuredOutputsParams(regex="spare[0-9]+"), client_id="c").result(timeout=30)
        assert not any(future.done() for future in slow)  # done long before the slow ones' deadline
    finally:
        manager.shutdown()


def test_a_killed_workers_place_is_taken_by_the_ready_spare(manager):
    wait_ready(manager.pool, 3)
    slow = [manager.prepare(_slow(f"replaced{i}")) for i in range(2)]  # both workers; the spare stays free
    for future in slow:
        with pytest.raises(ValueError, match="to compile"):
            future.result(timeout=30)
    start = time.monotonic()
    assert manager.prepare(StructuredOutputsParams(regex="after[0-9]+")).result(timeout=30) is not None
    assert time.monotonic() - start < 2.0  # the spare, not a fresh worker (~5 s of CPU to start)


@pytest.mark.slow
def test_the_pool_shrinks_back_when_idle(manager):
    backend = manager.backend
    pool = CompilePool(backend.worker_setup, backend.worker_payload(), backend.load_compiled, num_workers=1,
                       max_workers=3, spare_after_s=0.05, retire_after_s=0.5)
    try:
        wait_ready(pool, 2)
        jobs = [pool.submit("json", slow_json_schema_text(f"grow{i}", 1), 60) for i in range(2)]
        assert wait_for(lambda: len(pool.worker_pids()) == 3)  # the spare took the second job; a new spare
        for job in jobs:
            job.compiled.result(timeout=120)
        assert wait_for(lambda: len(pool.worker_pids()) == 2)  # one worker and the spare again
    finally:
        pool.shutdown()


def test_event_loop_stays_responsive_during_a_slow_compile(manager):
    async def longest_gap_while(future) -> float:
        loop, longest = asyncio.get_running_loop(), 0.0
        last = loop.time()
        while not future.done():
            await asyncio.sleep(0.005)
            longest, last = max(longest, loop.time() - last), loop.time()
        return longest

    future = manager.prepare(_slow("ticker"))
    assert asyncio.run(longest_gap_while(future)) < 0.1
    assert isinstance(future.exception(), ValueError)


def test_pending_compiles_are_bounded_per_client(manager):
    first, second = manager.prepare(_slow("a1"), client_id="a"), manager.prepare(_slow("a2"), client_id="a")
    with pytest.raises(GrammarQueueFull, match="at most 2"):
        manager.prepare(_slow("a3"), client_id="a")
    shared = manager.prepare(_slow("a1"), client_id="b")  # another client: its own quota, and the shared compile
    assert shared is first
    for future in (first, second):
        with pytest.raises(ValueError):
            future.result(timeout=60)
    assert manager.prepare(StructuredOutputsParams(regex="a[0-9]+"), client_id="a").result(timeout=30)


@pytest.mark.slow
def test_cache_is_an_lru_bounded_by_bytes(tokenizer):
    manager = StructuredOutputManager(tokenizer, 320, [tokenizer.eos_token_id])
    try:
        specs = [StructuredOutputsParams(regex=f"{letter}[0-9]{{2,6}}") for letter in "abcd"]
        first = manager.prepare(specs[0])
        first.result(timeout=120)
        for spec in specs[1:3]:
            manager.prepare(spec).result(timeout=30)
        time.sleep(0.1)  # the cache accounts a compile in its future's callback, just after the result is set
        manager.cache_max_bytes = manager.cache_bytes  # room for these three (all four are the same size)
        assert manager.prepare(specs[0]) is first  # a hit, and now the most recently used
        manager.prepare(specs[3]).result(timeout=30)  # evicts specs[1], the least recently used
        time.sleep(0.1)
        assert manager.cache_bytes <= manager.cache_max_bytes
        assert manager.prepare(specs[0]) is first
        assert manager.prepare(specs[1]).result(timeout=30) is not None  # compiled again
    finally:
        manager.shutdown()


@pytest.mark.slow
def test_shutdown_abandons_compiles_within_a_second(tokenizer):
    manager = StructuredOutputManager(tokenizer, 320, [tokenizer.eos_token_id], compile_timeout_s=60)
    manager.prepare(StructuredOutputsParams(json_object=True)).result(timeout=120)
    pending = manager.prepare(_slow("shutdown"))
    time.sleep(0.3)  # compiling
    start = time.monotonic()
    manager.shutdown()
    assert time.monotonic() - start < 1.0
    with pytest.raises(GrammarCompileAbandoned):
        pending.result(timeout=1)
    with pytest.raises(GrammarCompileAbandoned):
        manager.prepare(StructuredOutputsParams(regex="x+"))


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_a_spec_nested_too_deeply_is_a_value_error(manager):
    deep = StructuredOutputsParams(json=_nested(1))
    deep.json = _nested(5000)  # past the params' own depth check: the manager's guard
    with pytest.raises(ValueError, match="structured_outputs.json is too deeply nested"):
        manager.prepare(deep)


def test_recursion_in_a_worker_compile_is_a_value_error():
    def recurse(kind, spec, report_parsed):
        raise RecursionError("maximum recursion depth exceeded")

    assert _compile_one(recurse, "json", "{}", lambda: None, 1 << 20) == (
        "failed", "structured_outputs.json is too deeply nested")


def test_bad_spec_is_a_value_error_at_add_time(manager):
    with pytest.raises(ValueError, match="structured_outputs.regex is invalid"):
        manager.new_requests(StructuredOutputsParams(regex="a(b"), 1)
