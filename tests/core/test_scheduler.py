"""Scheduler with a fake model: invariants after every step, chunked prefill, preemption, stop conditions."""

import random
import subprocess
import sys

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.params import SamplingParams

EOS = 0


def fake_token(request: Request) -> int:
    """A deterministic 'model': the next token depends only on the request and its length."""
    return 1 + (hash((request.request_id, request.num_tokens)) % 1000)


class FakeRunner:
    """Tracks which requests the runner would hold, and samples for those whose tokens are all computed."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.known: set[str] = set()

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        self.known -= output.finished_req_ids
        for data in output.new_reqs:
            assert data.req_id not in self.known, "a new request must not already be in the runner"
            self.known.add(data.req_id)
        for data in output.cached_reqs:
            assert data.req_id in self.known
        # A request samples when the step computes its last known token (the counts before the step are the
        # scheduler output's: the scheduler has already advanced its own).
        computed_before = {data.req_id: data.num_computed_tokens for data in [*output.new_reqs, *output.cached_reqs]}
        sampled = {}
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            if computed_before[req_id] + num_tokens == request.num_tokens:
                sampled[req_id] = fake_token(request)
        return ModelRunnerOutput(sampled)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=256, chunked=True):
    config = SchedulerConfig(max_num_seqs, budget, max_model_len, enable_chunked_prefill=chunked)
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def make_request(request_id, num_prompt, max_tokens=8, **params) -> Request:
    return Request(
        request_id,
        [7] * num_prompt,
        SamplingParams(max_tokens=max_tokens, **params),
        sampling_seed=0,
        eos_token_ids=(EOS,),
        max_tokens=max_tokens,
    )


def run_to_completion(scheduler: Scheduler, max_steps=10_000, runner: FakeRunner | None = None):
    """Step until every request is done, checking the invariants after each step. Returns the step log."""
    runner = runner or FakeRunner(scheduler)
    config = scheduler.config
    finished, admissions, steps = {}, [], []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        running_before = {r.request_id: r.arrival_seq for r in scheduler.running}
        output = scheduler.schedule()
        _check_step(scheduler, output, running_before)
        admissions += [d.req_id for d in output.new_reqs if d.num_computed_tokens == 0 and not d.token_ids[d.num_prompt_tokens:]]
        steps.append(output)
        for core_output in scheduler.update_from_output(output, runner.execute(output)):
            if core_output.finished:
                finished[core_output.request_id] = core_output
        scheduler.kv_cache_manager.pool.check_invariants()
        assert len(scheduler.running) <= config.max_num_seqs
    else:
        pytest.fail("requests did not finish")
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.pool.num_blocks, "leaked blocks"
    return finished, admissions, steps


def _check_step(scheduler: Scheduler, output: SchedulerOutput, running_before: dict[str, int]) -> None:
    assert output.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
    assert output.total_num_scheduled_tokens == sum(output.num_scheduled_tokens.values())
    assert all(n > 0 for n in output.num_scheduled_tokens.values())
    # Preemption takes the latest arrivals: every preempted request arrived after every survivor.
    preempted = [seq for rid, seq in running_before.items() if rid in output.finished_req_ids]
    survivors = [r.arrival_seq for r in scheduler.running if r.request_id in running_before]
    if preempted and survivors:
        assert min(preempted) > max(survivors)


def test_random_workload_keeps_invariants_and_finishes_everything():
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=6, budget=24, max_model_len=128)
    requests = [make_request(f"r{i}", rng.randint(1, 60), max_tokens=rng.randint(1, 40)) for i in range(40)]
    for request in requests:
        scheduler.add_request(request)
    finished, admissions, _ = run_to_completion(scheduler)
    assert set(finished) == {r.request_id for r in requests}
    assert all(len(r.output_token_ids) == r.max_tokens for r in requests)
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in requests)
    assert admissions == sorted(admissions, key=lambda rid: int(rid[1:])), "FCFS admission order"
    assert scheduler.num_preemptions_total > 0, "the workload was meant to force preemption"


def test_preempted_request_resumes_and_generates_the_same_tokens():
    """With a deterministic model, outputs after preemption + recompute equal those of a roomy run."""

    def outputs(num_blocks):
        scheduler = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=8, budget=64)
        requests = [make_request(f"r{i}", 10 + i, max_tokens=30) for i in range(6)]
        for request in requests:
            scheduler.add_request(request)
        run_to_completion(scheduler)
        return {r.request_id: r.output_token_ids for r in requests}, scheduler.num_preemptions_total

    roomy, roomy_preemptions = outputs(200)
    tight, tight_preemptions = outputs(24)
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight == roomy


def test_chunked_prefill_splits_long_prompts_alongside_decodes():
    scheduler = make_scheduler(budget=16, max_num_seqs=4)
    scheduler.add_request(make_request("short", 3, max_tokens=20))
    scheduler.add_request(make_request("long", 50, max_tokens=2))
    _, _, steps = run_to_completion(scheduler)
    chunks = [s.num_scheduled_tokens.get("long") for s in steps if "long" in s.num_scheduled_tokens]
    assert chunks[:4] == [13, 15, 15, 7], chunks  # 16-token budget minus short's prompt, then minus its decode
    mixed = [s for s in steps if s.num_scheduled_tokens.get("short") == 1 and s.num_scheduled_tokens.get("long", 0) > 1]
    assert mixed, "decodes must run in the same steps as prefill chunks"


def test_without_chunked_prefill_prompts_are_never_split():
    scheduler = make_scheduler(budget=64, max_model_len=64, chunked=False)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", 30, max_tokens=3))
    _, _, steps = run_to_completion(scheduler)
    for step in steps:
        for data in step.new_reqs:
            assert step.num_scheduled_tokens[data.req_id] == len(data.token_ids)


def test_max_num_seqs_limits_the_batch():
    scheduler = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", 4, max_tokens=5))
    _, _, steps = run_to_completion(scheduler)
    assert max(len(s.num_scheduled_tokens) for s in steps) == 2


def test_stop_conditions():
    scheduler = make_scheduler()
    eos_request = make_request("eos", 4, max_tokens=50)
    ignore_request = make_request("ignore", 4, max_tokens=5, ignore_eos=True)
    min_tokens_request = make_request("min", 4, max_tokens=50, min_tokens=3)
    stop_id_request = make_request("stopid", 4, max_tokens=50, stop_token_ids=[99])
    for request in (eos_request, ignore_request, min_tokens_request, stop_id_request):
        scheduler.add_request(request)
    output = scheduler.schedule()
    tokens = {"eos": EOS, "ignore": EOS, "min": EOS, "stopid": 99}
    results = scheduler.update_from_output(output, ModelRunnerOutput(tokens))
    by_id = {r.request_id: r for r in results}
    assert by_id["eos"].finish_reason == "stop" and by_id["eos"].stop_reason is None
    assert by_id["stopid"].finish_reason == "stop" and by_id["stopid"].stop_reason == 99
    assert by_id["ignore"].finish_reason is None  # eos ignored
    assert by_id["min"].finish_reason is None  # eos before min_tokens does not stop


def test_context_limit_finishes_with_length():
    scheduler = make_scheduler(max_model_len=12)
    request = make_request("r", 10, max_tokens=100)
    scheduler.add_request(request)
    finished, _, _ = run_to_completion(scheduler)
    assert finished["r"].finish_reason == "length"
    assert request.num_tokens == 12


def test_abort_frees_blocks_at_once():
    scheduler = make_scheduler()
    request = make_request("r", 20, max_tokens=100)
    scheduler.add_request(request)
    scheduler.update_from_output(scheduler.schedule(), ModelRunnerOutput({"r": 5}))
    assert scheduler.kv_cache_manager.num_free_blocks < 64
    scheduler.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert request.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.kv_cache_manager.num_free_blocks == 64
    assert not scheduler.has_unfinished_requests()
    assert "r" in scheduler.schedule().finished_req_ids  # the runner is told to drop it


def test_abort_of_waiting_request_and_duplicate_ids():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", 4))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("r", 4))
    scheduler.finish_requests(["r", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished_requests()


def test_core_does_not_import_torch():
    code = "import sys, pagedllm.core.scheduler, pagedllm.engine.metrics; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
