"""Swap preemption with a fake KV cache that stores token ids: every step checks that each request's block table
holds exactly its tokens, so a wrong swap mapping, a lost block or a stale copy shows at once."""

from __future__ import annotations

import random

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.params import SamplingParams
from tests.core.test_scheduler import fake_token

BLOCK_SIZE = 4


class FakeKVRunner:
    """Keeps block contents (token ids per slot) on a 'device' and a 'CPU' pool and applies the scheduler's diff."""

    def __init__(self, scheduler: Scheduler, num_blocks: int, num_cpu_blocks: int) -> None:
        self.scheduler = scheduler
        self.device = [[None] * BLOCK_SIZE for _ in range(num_blocks)]
        self.cpu = [[None] * BLOCK_SIZE for _ in range(num_cpu_blocks)]
        self.tables: dict[str, list[int]] = {}

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in output.finished_req_ids:
            self.tables.pop(req_id, None)
        for src, dst in output.blocks_to_swap_out:
            self.cpu[dst] = list(self.device[src])
        for src, dst in output.blocks_to_copy:
            self.device[dst] = list(self.device[src])
        for src, dst in output.blocks_to_swap_in:
            self.device[dst] = list(self.cpu[src])
        for data in output.new_reqs:
            self.tables[data.req_id] = list(data.block_ids)
        for data in output.cached_reqs:
            if data.block_ids_reset is not None:
                self.tables[data.req_id] = list(data.block_ids_reset)
            else:
                self.tables[data.req_id] += data.new_block_ids
        computed_before = {data.req_id: data.num_computed_tokens for data in [*output.new_reqs, *output.cached_reqs]}
        sampled = {}
        for req_id, num_new in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            tokens = request.all_token_ids
            start = computed_before[req_id]
            self._check_cached_prefix(req_id, tokens[:start])
            for position in range(start, start + num_new):
                block = self.tables[req_id][position // BLOCK_SIZE]
                self.device[block][position % BLOCK_SIZE] = tokens[position]
            if start + num_new == request.num_tokens:
                sampled[req_id] = fake_token(request)
        return ModelRunnerOutput(sampled)

    def _check_cached_prefix(self, req_id: str, tokens: list[int]) -> None:
        table = self.tables[req_id]
        cached = [self.device[table[p // BLOCK_SIZE]][p % BLOCK_SIZE] for p in range(len(tokens))]
        assert cached == tokens, f"{req_id}: KV cache does not hold the request's tokens"


def run(preemption_mode: str, num_blocks: int, num_cpu_blocks: int, seed: int = 0):
    config = SchedulerConfig(8, 48, 256, preemption_mode=preemption_mode)
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False, num_cpu_blocks=num_cpu_blocks)
    scheduler = Scheduler(config, kv)
    runner = FakeKVRunner(scheduler, num_blocks, num_cpu_blocks)
    rng = random.Random(seed)
    requests = [
        Request(f"r{i}", [rng.randrange(1, 99) for _ in range(rng.randint(3, 30))], SamplingParams(max_tokens=40),
                0, (0,), max_tokens=rng.randint(5, 40))
        for i in range(16)
    ]
    for request in requests:
        scheduler.add_request(request)
    swapped_seen = False
    for _ in range(5000):
        if not scheduler.has_unfinished_requests():
            break
        output = scheduler.schedule()
        scheduler.update_from_output(output, runner.execute(output))
        swapped_seen |= any(r.status == RequestStatus.SWAPPED for r in scheduler.waiting)
        kv.pool.check_invariants()
        if kv.cpu_pool:
            kv.cpu_pool.check_invariants()
    assert not scheduler.has_unfinished_requests()
    assert kv.num_free_blocks == num_blocks, "device blocks leaked"
    assert kv.cpu_pool is None or kv.cpu_pool.num_free_blocks == num_cpu_blocks, "CPU blocks leaked"
    return {r.request_id: r.output_token_ids for r in requests}, scheduler, swapped_seen


@pytest.mark.parametrize("seed", range(3))
def test_swap_preemption_keeps_the_kv_cache_exact_and_outputs_unchanged(seed):
    roomy, _, _ = run("recompute", num_blocks=400, num_cpu_blocks=0, seed=seed)
    swapped, scheduler, swapped_seen = run("swap", num_blocks=24, num_cpu_blocks=64, seed=seed)
    recomputed, recompute_scheduler, _ = run("recompute", num_blocks=24, num_cpu_blocks=0, seed=seed)
    assert swapped == roomy == recomputed
    assert swapped_seen and scheduler.num_swap_preemptions_total > 0
    assert recompute_scheduler.num_swap_preemptions_total == 0 and recompute_scheduler.num_preemptions_total > 0


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full():
    _, scheduler, _ = run("swap", num_blocks=24, num_cpu_blocks=3)
    assert scheduler.num_preemptions_total > scheduler.num_swap_preemptions_total


def test_auto_mode_recomputes_short_contexts():
    _, scheduler, _ = run("auto", num_blocks=24, num_cpu_blocks=64)
    assert scheduler.num_preemptions_total > 0 and scheduler.num_swap_preemptions_total == 0  # all < 256 tokens


def test_abort_of_a_swapped_request_frees_its_cpu_blocks():
    config = SchedulerConfig(4, 64, 256, preemption_mode="swap")
    kv = KVCacheManager(6, BLOCK_SIZE, num_cpu_blocks=8)
    scheduler = Scheduler(config, kv)
    runner = FakeKVRunner(scheduler, 6, 8)
    for i in range(3):
        scheduler.add_request(Request(f"r{i}", [5] * 6, SamplingParams(max_tokens=30), 0, (0,), max_tokens=30))
    while not any(r.status == RequestStatus.SWAPPED for r in scheduler.waiting):
        output = scheduler.schedule()
        scheduler.update_from_output(output, runner.execute(output))
    victim = next(r for r in scheduler.waiting if r.status == RequestStatus.SWAPPED)
    scheduler.finish_requests([victim.request_id], RequestStatus.FINISHED_ABORTED)
    assert kv.cpu_pool.num_free_blocks == 8
