"""Pipeline parallelism through worker processes (gloo on CPU) with ``pipeline_parallel_size`` steps in flight: a batch
of many requests, with chunked prefill, preemption (recompute and swap), greedy and seeded sampling, gives the
tokens of one device, and the engine did keep pp steps launched and unanswered."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.distributed.conftest import ENGINE_KWARGS

NUM_REQUESTS = 12
# 16 tokens a step: the longer prompts are chunked over steps in flight; 24 blocks of 4 tokens for up to 8 requests
# of ~6-18 + 20 tokens: requests are preempted, some while their token is in flight.
SETTINGS = {**ENGINE_KWARGS, "max_num_seqs": 8, "max_num_batched_tokens": 16, "block_size": 4,
            "num_gpu_blocks_override": 24}


def prompts() -> list[list[int]]:
    return [[(5 * index + position) % 60 + 3 for position in range(6 * (1 + index % 3))] for index in range(NUM_REQUESTS)]


def params() -> list[SamplingParams]:
    """Greedy and seeded sampling, alternately (seeded draws depend on the seed and the output index only)."""
    return [SamplingParams(temperature=0.8, top_p=0.9, seed=index, max_tokens=20, ignore_eos=True) if index % 2
            else SamplingParams(temperature=0, max_tokens=20, ignore_eos=True) for index in range(NUM_REQUESTS)]


class UnansweredCounter:
    """The most steps the mp executor had launched and not yet answered, seen right after each launch."""

    def __init__(self, executor) -> None:
        self.most = 0
        launch = executor.execute_model_async

        def counting_launch(scheduler_output):
            step = launch(scheduler_output)
            self.most = max(self.most, len(executor._unanswered))
            return step

        executor.execute_model_async = counting_launch


def generate(model_dir: str, preemption_mode: str, **parallel) -> tuple[list[list[int]], LLM, UnansweredCounter | None]:
    swap = {"swap_space": 0.001} if preemption_mode == "swap" else {}
    llm = LLM(model_dir, **SETTINGS, preemption_mode=preemption_mode, **swap, **parallel)
    core = llm.llm_engine.engine_core
    counter = UnansweredCounter(core.executor) if parallel else None
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params(), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], llm, counter
    finally:
        core.shutdown()


@pytest.mark.slow  # worker processes: 6-10 s each on 2 cores
@pytest.mark.parametrize(("tp", "pp", "preemption_mode"), [
    (1, 2, "recompute"),
    (2, 2, "swap"),
    (1, 3, "recompute"),  # on Gemma 3 (3 layers): a layer per stage
])
def test_many_requests_with_chunking_and_preemption_equal_one_device(tiny_model_dir, tp, pp, preemption_mode):
    model_dir = tiny_model_dir("gemma3" if pp == 3 else "llama")
    expected, _, _ = generate(model_dir, preemption_mode)
    got, llm, counter = generate(model_dir, preemption_mode, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert got == expected
    assert counter.most == pp  # one step per stage in flight
    scheduler = llm.llm_engine.engine_core.scheduler
    assert scheduler.num_preemptions_total > 0
    if preemption_mode == "swap":
        assert scheduler.num_swap_preemptions_total > 0
    pool = scheduler.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks
