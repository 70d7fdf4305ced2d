"""The scheduler with LoRA: no step holds more distinct adapters than ``max_loras``, requests of other adapters wait
(and all finish), and prefix-cache blocks are keyed by adapter."""

from __future__ import annotations

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.lora.request import LoRARequest
from pagedllm.params import SamplingParams
from tests.core.test_scheduler import EOS, FakeRunner


def lora_request(lora_id: int) -> LoRARequest:
    return LoRARequest(f"adapter{lora_id}", lora_id, f"/adapters/{lora_id}")


def make_request(request_id: str, lora_id: int, num_prompt: int = 6, max_tokens: int = 5) -> Request:
    return Request(request_id, [7] * num_prompt, SamplingParams(max_tokens=max_tokens), sampling_seed=0,
                   eos_token_ids=(EOS,), max_tokens=max_tokens,
                   lora_request=lora_request(lora_id) if lora_id else None)


def test_no_step_holds_more_adapters_than_slots_and_all_finish() -> None:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, max_loras=2)
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(config, kv)
    for index in range(12):
        scheduler.add_request(make_request(f"r{index}", index % 4))  # base + 3 adapters, interleaved
    runner = FakeRunner(scheduler)
    finished, max_adapters, steps = set(), 0, 0
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        adapters = {scheduler.requests[r].lora_int_id for r in output.num_scheduled_tokens} - {0}
        max_adapters = max(max_adapters, len(adapters))
        running_adapters = {r.lora_int_id for r in scheduler.running} - {0}
        assert len(running_adapters) <= 2
        for out in scheduler.update_from_output(output, runner.execute(output)):
            if out.finish_reason is not None:
                finished.add(out.request_id)
        steps += 1
        assert steps < 500
    assert finished == {f"r{index}" for index in range(12)}
    assert max_adapters == 2  # the slots were used, never exceeded
    assert kv.num_free_blocks == 64


def test_prefix_cache_keys_blocks_by_adapter() -> None:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, max_loras=4)
    kv = KVCacheManager(64, 4, enable_prefix_caching=True)
    scheduler = Scheduler(config, kv)
    runner = FakeRunner(scheduler)

    def run(request: Request) -> int:
        scheduler.add_request(request)
        output = scheduler.schedule()
        hits = output.new_reqs[0].num_computed_tokens
        scheduler.update_from_output(output, runner.execute(output))
        while scheduler.has_unfinished_requests():
            output = scheduler.schedule()
            scheduler.update_from_output(output, runner.execute(output))
        return hits

    assert run(make_request("a1", 1, num_prompt=13)) == 0
    assert run(make_request("a1-again", 1, num_prompt=13)) == 12  # the same adapter shares its prompt blocks
    assert run(make_request("a2", 2, num_prompt=13)) == 0  # another adapter does not
    assert run(make_request("base", 0, num_prompt=13)) == 0  # nor does the base model
    assert run(make_request("base-again", 0, num_prompt=13)) == 12
