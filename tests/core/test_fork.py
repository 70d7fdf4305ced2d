"""Parallel sampling: later sequences fork from the first one's prompt blocks, shared, with copy-on-write."""

from __future__ import annotations

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.params import SamplingParams
from tests.core.test_swap import BLOCK_SIZE, FakeKVRunner


def family(name: str, prompt: list[int], n: int, max_tokens: int, fork: bool = True) -> list[Request]:
    ids = [name if n == 1 else f"{i}_{name}" for i in range(n)]
    return [
        Request(ids[i], list(prompt), SamplingParams(max_tokens=max_tokens), 0, (0,), max_tokens,
                fork_source=ids[0] if fork and i > 0 else None)
        for i in range(n)
    ]


def run(requests: list[Request], num_blocks: int = 64, preemption_mode: str = "recompute", num_cpu_blocks: int = 0):
    config = SchedulerConfig(16, 64, 256, preemption_mode=preemption_mode)
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, num_cpu_blocks=num_cpu_blocks)
    scheduler = Scheduler(config, kv)
    runner = FakeKVRunner(scheduler, num_blocks, num_cpu_blocks)  # checks every table holds its request's tokens
    for request in requests:
        scheduler.add_request(request)
    peak_blocks, copies = 0, 0
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        copies += len(output.blocks_to_copy)
        scheduler.update_from_output(output, runner.execute(output))
        kv.pool.check_invariants()
        peak_blocks = max(peak_blocks, num_blocks - kv.num_free_blocks)
    assert kv.num_free_blocks == num_blocks
    return peak_blocks, copies, scheduler


@pytest.mark.parametrize("prompt_len", [9, 12, 13])  # last prompt block partial, full, and with one token
def test_forked_sequences_share_prompt_blocks_and_copy_on_write(prompt_len):
    prompt = list(range(1, prompt_len + 1))
    shared_peak, copies, _ = run(family("a", prompt, 4, max_tokens=6))
    independent_peak, no_copies, _ = run(family("a", prompt, 4, max_tokens=6, fork=False))
    full_prompt_blocks = (prompt_len - 1) // BLOCK_SIZE
    assert shared_peak <= independent_peak - 3 * full_prompt_blocks  # the lagging forks may need even fewer at once
    assert no_copies == 0
    # The block holding the last prompt token is shared and copied once per writer that is not its last holder.
    assert copies == (0 if (prompt_len - 1) % BLOCK_SIZE == 0 else 3)


def test_forks_survive_preemption_by_recompute_and_swap():
    requests = family("a", list(range(1, 19)), 4, max_tokens=20) + family("b", list(range(40, 51)), 3, max_tokens=20)
    for mode, cpu_blocks in (("recompute", 0), ("swap", 64)):
        _, _, scheduler = run([Request(r.request_id, r.prompt_token_ids, r.sampling_params, 0, (0,), r.max_tokens,
                                       fork_source=r.fork_source) for r in requests],
                              num_blocks=22, preemption_mode=mode, num_cpu_blocks=cpu_blocks)
        assert scheduler.num_preemptions_total > 0
