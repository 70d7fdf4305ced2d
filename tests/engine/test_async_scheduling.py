"""Async scheduling gives the same tokens as the synchronous loop: the scheduler plans step N+1 while step N runs,
with a placeholder for each token step N samples, which step N+1 reads on the device.

Each test runs the same requests with ``async_scheduling`` off and on and compares every output (tokens, text,
finish and stop reasons, logprobs), under the features that interact with a token not yet known on the host:
chunked prefill, prefix hits, parallel sampling, seeded sampling, penalties, min_tokens, stop strings and stop ids,
logprobs, preemption (recompute and swap), structured outputs, beam search and aborts. It also checks that the
async runs did overlap steps (placeholders were used) and that no KV block leaked.
"""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.engine import LLMEngine
from pagedllm.params import BeamSearchParams, RequestOutputKind, StructuredOutputsParams
from pagedllm.worker.model_runner import ModelRunner
from tests.utils import metric

ENGINE = dict(device="cpu", block_size=4, max_model_len=160, seed=0)


class PlaceholderCounter:
    """Counts the steps that read a token the previous step was still sampling."""

    def __init__(self, runner: ModelRunner) -> None:
        self.num_steps = 0
        fill = runner._fill_placeholders

        def counting_fill(inputs):
            self.num_steps += bool(inputs.placeholder_indices)
            return fill(inputs)

        runner._fill_placeholders = counting_fill


def make_llm(model_dir: str, async_scheduling: bool, **engine_kwargs) -> tuple[LLM, PlaceholderCounter]:
    llm = LLM(model_dir, async_scheduling=async_scheduling, **{**ENGINE, **engine_kwargs})
    return llm, PlaceholderCounter(llm.llm_engine.engine_core.model_runner)


def summary(output) -> list[tuple]:
    """What must be equal between the two loops, for every sequence of a request."""
    return [
        (c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason,
         [{token: round(lp.logprob, 5) for token, lp in pos.items()} for pos in c.logprobs or []])
        for c in output.outputs
    ]


def assert_no_leak(llm: LLM) -> None:
    pool = llm.llm_engine.engine_core.scheduler.kv_cache_manager.pool
    pool.check_invariants()
    assert pool.num_free_blocks == pool.num_blocks, "KV blocks leaked"


def generate_both(model_dir: str, prompts, params, expect_overlap: bool = True,
                  **engine_kwargs) -> tuple[list, list, LLM, LLM]:
    """Generate with each loop; assert equal outputs, that only the async one overlapped steps (when
    ``expect_overlap``), and no leak in either."""
    runs = {}
    for async_scheduling in (False, True):
        llm, counter = make_llm(model_dir, async_scheduling, **engine_kwargs)
        compile_grammars(llm, params)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert_no_leak(llm)
        assert (counter.num_steps > 0) == (async_scheduling and expect_overlap), "overlapped steps"
        runs[async_scheduling] = (outputs, llm)
    (sync_outputs, sync_llm), (async_outputs, async_llm) = runs[False], runs[True]
    for sync_output, async_output in zip(sync_outputs, async_outputs, strict=True):
        assert summary(async_output) == summary(sync_output), sync_output.request_id
    return sync_outputs, async_outputs, sync_llm, async_llm


def compile_grammars(llm: LLM, params: list[SamplingParams]) -> None:
    """Compile the requests' grammars into the cache first. A request whose grammar still compiles waits while
    the others run (and overlap), so how many steps overlap would otherwise depend on the compile threads' timing."""
    manager = llm.llm_engine.engine_core.structured_output_manager
    for spec in {repr(p.structured_outputs): p.structured_outputs for p in params if p.structured_outputs}.values():
        manager.prepare(spec).result()


def text_prompts(num: int, seed: int = 0) -> list[str]:
    """Prompts that share a long prefix (prefix-cache hits) and differ in their tails."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "home"]
    prefix = " ".join(rng.choice(words) for _ in range(24))
    return [prefix + " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(num)]


def varied_params() -> list[SamplingParams]:
    """One request per feature that reads or counts the tokens generated so far."""
    return [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=1, max_tokens=18, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=5, min_p=0.05, seed=2, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.3, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=4, frequency_penalty=0.5, presence_penalty=0.4, max_tokens=16),
        SamplingParams(temperature=0, min_tokens=6, max_tokens=14),
        SamplingParams(temperature=0.7, seed=5, logprobs=3, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=6, stop=["a"], max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=7, stop_token_ids=[5, 9, 17], max_tokens=30, ignore_eos=True),
        SamplingParams(n=3, temperature=0.9, seed=8, max_tokens=12, ignore_eos=True),
        SamplingParams(n=2, temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.6, seed=9, max_tokens=1, ignore_eos=True),
    ]


def test_features_that_read_generated_tokens_match_the_synchronous_loop(tokenized_llama_dir):
    params = varied_params()
    prompts = text_prompts(len(params))
    # A small token budget: long prompts are chunked over several steps, alongside decodes.
    generate_both(tokenized_llama_dir, prompts, params, max_num_batched_tokens=24, max_num_seqs=16)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_preemption_matches_the_synchronous_loop(tokenized_llama_dir, preemption_mode):
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=28, ignore_eos=True) for i in range(8)]
    params[3] = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    swap = dict(swap_space=0.001) if preemption_mode == "swap" else {}
    # 48 blocks of 4 tokens for 8 requests of ~20 + 28 tokens each: requests must be preempted and resumed.
    _, _, sync_llm, async_llm = generate_both(tokenized_llama_dir, text_prompts(8, seed=1), params,
                                              num_gpu_blocks_override=48, preemption_mode=preemption_mode, **swap)
    for llm in (sync_llm, async_llm):
        assert metric(llm, "num_preemptions_total") > 0
        if preemption_mode == "swap":
            assert llm.llm_engine.engine_core.scheduler.num_swap_preemptions_total > 0


@pytest.mark.slow
def test_structured_outputs_match_the_synchronous_loop(tokenized_llama_dir):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    constrained = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=24, structured_outputs=StructuredOutputsParams(json=schema))
        for i in range(3)
    ]
    constrained.append(SamplingParams(temperature=0, max_tokens=12,
                                      structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"])))
    free = [SamplingParams(temperature=0.8, seed=10 + i, max_tokens=20, ignore_eos=True) for i in range(4)]
    params = [p for pair in zip(constrained, free) for p in pair]  # constrained and free rows in one batch
    # A step with a row under a grammar waits for the step before (the grammar must see every token): no overlap.
    _, async_outputs, _, _ = generate_both(tokenized_llama_dir, text_prompts(len(params), seed=2), params,
                                           expect_overlap=False)
    assert async_outputs[-2].outputs[0].text in ("yes", "no", "maybe")


def test_beam_search_matches_the_synchronous_loop(tokenized_llama_dir):
    results = {}
    for async_scheduling in (False, True):
        llm, _ = make_llm(tokenized_llama_dir, async_scheduling)
        outputs = llm.beam_search(text_prompts(2, seed=3), BeamSearchParams(beam_width=3, max_tokens=8))
        results[async_scheduling] = [[(s.token_ids, round(s.cumulative_logprob, 5)) for s in o.sequences] for o in outputs]
        assert_no_leak(llm)
    assert results[True] == results[False]


def run_with_abort(model_dir: str, async_scheduling: bool) -> dict[str, tuple]:
    """Six requests; one is aborted after a few steps. Returns every request's final output summary."""
    llm, _ = make_llm(model_dir, async_scheduling)
    engine: LLMEngine = llm.llm_engine
    for i, prompt in enumerate(text_prompts(6, seed=4)):
        params = SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        engine.add_request(f"r{i}", prompt, params)
    finished, num_steps = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            finished[output.request_id] = output
        num_steps += 1
        if num_steps == 4:
            engine.abort_request("r2")
    assert_no_leak(llm)
    return finished


def test_abort_mid_run_leaves_the_others_unchanged(tokenized_llama_dir):
    sync_finished = run_with_abort(tokenized_llama_dir, async_scheduling=False)
    async_finished = run_with_abort(tokenized_llama_dir, async_scheduling=True)
    assert "r2" not in async_finished and "r2" not in sync_finished  # an aborted request has no final output
    for request_id in ("r0", "r1", "r3", "r4", "r5"):
        assert summary(async_finished[request_id]) == summary(sync_finished[request_id])


def test_request_id_reused_after_abort_gets_only_its_own_tokens(tokenized_llama_dir):
    """An aborted request's token still in flight must not reach a new request that takes its id."""
    llm, _ = make_llm(tokenized_llama_dir, async_scheduling=True)
    engine: LLMEngine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    engine.add_request("same", text_prompts(1, seed=5)[0], params)
    engine.step()  # launched, its token in flight
    engine.abort_request("same")
    engine.add_request("same", text_prompts(1, seed=6)[0], params)
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output
    reference = LLM(tokenized_llama_dir, **ENGINE).generate(text_prompts(1, seed=6), params, use_tqdm=False)[0]
    assert outputs["same"].outputs[0].token_ids == reference.outputs[0].token_ids
    assert_no_leak(llm)
