"""Embedding (pooling) requests in the scheduler, with a fake runner: prefill only, no placeholder or sampled
token, finished with the vector when the prompt is computed, blocks freed at once; never rescheduled while the
vector is in flight (async scheduling); generation requests beside them are unaffected."""

from pagedllm.config import SchedulerConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.params import SamplingParams
from pagedllm.pooling.params import PoolingParams


def make_scheduler(num_blocks: int = 32, budget: int = 8, prefix_caching: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(4, budget, 64), KVCacheManager(num_blocks, 4, prefix_caching))


def pooling_request(request_id: str, tokens: list[int], pooling_type: str = "LAST") -> Request:
    params = PoolingParams(pooling_type=pooling_type, normalize=True)
    return Request(request_id, tokens, SamplingParams(max_tokens=1), 0, (0,), 1, pooling_params=params)


def pooled_output(scheduler_output: SchedulerOutput, scheduler: Scheduler) -> ModelRunnerOutput:
    """What the runner returns: a vector for each pooling request whose prompt the step completes."""
    pooled = {}
    for data in [*scheduler_output.new_reqs, *scheduler_output.cached_reqs]:
        request = scheduler.requests[data.req_id]
        if data.num_computed_tokens + scheduler_output.num_scheduled_tokens[data.req_id] == request.num_prompt_tokens:
            pooled[data.req_id] = [1.0, 0.0]
    return ModelRunnerOutput({}, pooled_outputs=pooled)


def test_a_chunked_pooling_request_finishes_with_its_vector_and_frees_its_blocks():
    scheduler = make_scheduler()
    scheduler.add_request(pooling_request("e", list(range(1, 21))))
    outputs = []
    while scheduler.has_unfinished_requests():
        step = scheduler.schedule()
        assert step.total_num_scheduled_tokens <= 8
        assert all(r.num_output_placeholders == 0 for r in scheduler.requests.values())
        outputs += scheduler.update_from_output(step, pooled_output(step, scheduler))
    assert [(o.request_id, o.new_token_ids, o.finish_reason, o.pooled_output) for o in outputs] == [
        ("e", [], "stop", [1.0, 0.0])]
    assert scheduler.kv_cache_manager.num_free_blocks == 32


def test_no_step_is_scheduled_while_the_vector_is_in_flight():
    """Async scheduling plans step N+1 before step N's output: a pooling request whose prompt step N completes
    must not be scheduled again (it has nothing left to compute)."""
    scheduler = make_scheduler(budget=32)
    scheduler.add_request(pooling_request("e", list(range(1, 11))))
    first = scheduler.schedule()
    second = scheduler.schedule()
    assert first.num_scheduled_tokens == {"e": 10} and second.num_scheduled_tokens == {}
    scheduler.update_from_output(first, pooled_output(first, scheduler))
    scheduler.update_from_output(second, ModelRunnerOutput({}))
    assert not scheduler.has_unfinished_requests()


def test_prefix_cache_hits_for_last_token_pooling_only():
    scheduler = make_scheduler(budget=32)
    prompt = list(range(1, 18))
    for round_index, pooling_type in enumerate(["LAST", "LAST", "MEAN", "CLS"]):
        scheduler.add_request(pooling_request(f"e{round_index}", prompt, pooling_type))
        step = scheduler.schedule()
        expected = 17 if round_index != 1 else 1  # the second LAST request hits 16 cached tokens
        assert step.num_scheduled_tokens == {f"e{round_index}": expected}
        scheduler.update_from_output(step, pooled_output(step, scheduler))
    assert scheduler.kv_cache_manager.num_free_blocks == 32
