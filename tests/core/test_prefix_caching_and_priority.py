"""Prefix caching in the scheduler (hits, LRU eviction of cached free blocks) and the priority policy."""

from __future__ import annotations

from pagedllm.config import SchedulerConfig
from pagedllm.core.interface import ModelRunnerOutput
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.params import SamplingParams
from tests.core.test_scheduler import FakeRunner, run_to_completion


def make_scheduler(num_blocks=32, block_size=4, max_num_seqs=8, budget=64, policy="fcfs", prefix_caching=True):
    config = SchedulerConfig(max_num_seqs, budget, 256, policy=policy)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching))


def make_request(request_id, prompt, max_tokens=4, priority=0, **params) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, **params), 0, (0,), max_tokens,
                   priority=priority)


def step(scheduler: Scheduler, runner: FakeRunner):
    output = scheduler.schedule()
    scheduler.update_from_output(output, runner.execute(output))
    scheduler.kv_cache_manager.pool.check_invariants()
    return output


def test_second_request_with_the_same_prefix_computes_only_the_rest():
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    prompt = list(range(10, 50))  # 40 tokens = 10 full blocks
    scheduler.add_request(make_request("a", prompt))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", prompt + [7, 8]))
    output = step(scheduler, runner)
    new = next(d for d in output.new_reqs if d.req_id == "b")
    assert new.num_computed_tokens == 40 and output.num_scheduled_tokens["b"] == 2
    assert new.block_ids[:10] == scheduler.kv_cache_manager.get_block_ids("a")[:10]  # shared, not copied
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (40 + 42, 40)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    prompt = list(range(10, 26))  # exactly 4 full blocks
    scheduler.add_request(make_request("a", prompt))
    run_to_completion(scheduler)
    scheduler.add_request(make_request("b", prompt))
    output = step(scheduler, runner)
    assert output.num_scheduled_tokens["b"] == 4  # 3 blocks hit; the last block holds the token to sample from


def test_cached_free_blocks_are_evicted_least_recently_used_first():
    scheduler = make_scheduler(num_blocks=12)
    kv = scheduler.kv_cache_manager
    old = list(range(100, 124))  # 6 blocks
    scheduler.add_request(make_request("old", old, max_tokens=1))
    run_to_completion(scheduler)
    assert kv.num_free_blocks == 12  # finished: free, but still cached
    # 8 blocks of new content: the 6 never-used blocks go first, then the tail of "old" (freed first).
    scheduler.add_request(make_request("new", list(range(500, 532)), max_tokens=1))
    run_to_completion(scheduler)
    hits, num_cached = kv.get_computed_blocks(make_request("again", old))
    assert num_cached == 16  # the first 4 blocks of "old" survived; its last 2 were evicted


def test_no_prefix_hits_when_disabled_or_prompt_logprobs_requested():
    for scheduler, params in ((make_scheduler(prefix_caching=False), {}), (make_scheduler(), {"prompt_logprobs": 1})):
        runner = FakeRunner(scheduler)
        scheduler.add_request(make_request("a", range(10, 50), **params))
        step(scheduler, runner)
        scheduler.add_request(make_request("b", range(10, 50), **params))
        output = step(scheduler, runner)
        assert output.num_scheduled_tokens["b"] == 40


def test_preempted_request_resumes_from_its_cached_blocks():
    scheduler = make_scheduler(num_blocks=17, budget=64)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", range(100 * i, 100 * i + 15), max_tokens=12))
    finished, _, _ = run_to_completion(scheduler)
    assert scheduler.num_preemptions_total > 0 and scheduler.prefix_cache_hits > 0
    assert len(finished) == 3


def test_priority_request_jumps_the_queue_and_preempts_lower_priority():
    scheduler = make_scheduler(max_num_seqs=2, policy="priority", prefix_caching=False)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("low1", range(10, 14), max_tokens=50, priority=5))
    scheduler.add_request(make_request("low2", range(20, 24), max_tokens=50, priority=5))
    step(scheduler, runner)
    scheduler.add_request(make_request("low3", range(30, 34), max_tokens=50, priority=5))
    scheduler.add_request(make_request("high", range(40, 44), max_tokens=50, priority=0))
    output = step(scheduler, runner)
    assert "high" in output.num_scheduled_tokens and "low3" not in output.num_scheduled_tokens
    assert scheduler.requests["low2"].status == RequestStatus.PREEMPTED  # the later of the two low ones
    assert [r.request_id for r in scheduler.waiting] == ["low2", "low3"]
    assert scheduler.requests["low1"].status == RequestStatus.RUNNING
    run_to_completion(scheduler, runner=runner)


def test_equal_priority_never_preempts_for_admission():
    scheduler = make_scheduler(max_num_seqs=1, policy="priority", prefix_caching=False)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("first", range(10, 14), max_tokens=5, priority=1))
    step(scheduler, runner)
    scheduler.add_request(make_request("second", range(20, 24), max_tokens=5, priority=1))
    step(scheduler, runner)
    assert scheduler.num_preemptions_total == 0 and scheduler.requests["second"].status == RequestStatus.WAITING


def test_fcfs_ignores_priority():
    scheduler = make_scheduler(max_num_seqs=1, prefix_caching=False)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", range(10, 14), priority=9))
    scheduler.add_request(make_request("b", range(20, 24), priority=0))
    assert list(step(scheduler, runner).num_scheduled_tokens) == ["a"]
    assert scheduler.num_preemptions_total == 0
    _ = ModelRunnerOutput  # the fake runner builds these
