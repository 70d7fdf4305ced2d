"""n > 1: the sequences share the prompt's blocks (copy-on-write), and equal independent seeded requests."""

from __future__ import annotations

from pagedllm import LLM, SamplingParams

KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=200, max_model_len=96, max_num_seqs=16,
              max_num_batched_tokens=64)


def test_n_seeded_sequences_equal_independent_seeded_requests(tiny_model):
    llm = LLM(tiny_model("qwen3"), enable_prefix_caching=False, **KWARGS)
    prompt = {"prompt_token_ids": [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 18, 77, 9]}
    params = SamplingParams(n=4, temperature=0.9, top_k=50, seed=123, max_tokens=12, ignore_eos=True)
    together = llm.generate(prompt, params, use_tqdm=False)[0].outputs
    singles = llm.generate(
        [prompt] * 4,
        [SamplingParams(temperature=0.9, top_k=50, seed=123 + i, max_tokens=12, ignore_eos=True) for i in range(4)],
        use_tqdm=False,
    )
    assert [c.token_ids for c in together] == [s.outputs[0].token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in together}) == 4


def test_parallel_sampling_shares_blocks(tiny_model):
    llm = LLM(tiny_model("qwen3"), enable_prefix_caching=False, **KWARGS)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": list(range(3, 43))}  # 40 tokens: 9 full blocks shared + 1 copied per sequence
    engine.add_request("shared", prompt, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=3,
                                                        ignore_eos=True))
    shared_peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        pool = engine.engine_core.scheduler.kv_cache_manager.pool
        shared_peak = max(shared_peak, pool.num_blocks - pool.num_free_blocks)
        assert pool.num_shared_blocks <= 10
    assert shared_peak <= 9 + 4 * 2  # independent requests would hold 4 * 11 = 44 blocks


def test_n_greedy_sequences_are_the_same_text(tiny_model):
    """n > 1 at temperature 0 (allowed, as in OpenAI's API): n copies of the greedy text, sharing the prompt."""
    llm = LLM(tiny_model("qwen3"), enable_prefix_caching=False, **KWARGS)
    prompt = {"prompt_token_ids": [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 18, 77, 9]}
    together = llm.generate(prompt, SamplingParams(n=3, temperature=0.0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)[0].outputs
    (single,) = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                             use_tqdm=False)[0].outputs
    assert [c.index for c in together] == [0, 1, 2]
    assert all(c.token_ids == single.token_ids for c in together)
