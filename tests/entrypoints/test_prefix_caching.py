"""Automatic prefix caching end to end: a prefix hit gives exactly the output of a miss, and saves compute."""

from __future__ import annotations

from pagedllm import LLM, SamplingParams
from tests.utils import metric

KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=96, max_model_len=128, max_num_batched_tokens=32,
              max_num_seqs=8)



def test_prefix_hits_give_the_same_outputs_as_misses(tiny_model):
    system = [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 18] * 3  # a 36-token shared "system prompt"
    prompts = [{"prompt_token_ids": system + [30 + i, 40 + i]} for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=11, max_tokens=10, ignore_eos=True)]
    cached = LLM(tiny_model("qwen2"), enable_prefix_caching=True, **KWARGS)
    uncached = LLM(tiny_model("qwen2"), enable_prefix_caching=False, **KWARGS)
    for sampling in params:
        expected = [o.outputs[0].token_ids for o in uncached.generate(prompts, sampling, use_tqdm=False)]
        for _ in range(2):  # the second round hits for every prompt
            assert [o.outputs[0].token_ids for o in cached.generate(prompts, sampling, use_tqdm=False)] == expected
    hits, queries = metric(cached, "prefix_cache_hits_total"), metric(cached, "prefix_cache_queries_total")
    assert hits >= 0.5 * queries
    assert metric(uncached, "prefix_cache_hits_total") == 0
    # Hits saved prompt compute: fewer prompt tokens went through the model than were queried.
    assert metric(cached, "kv_cache_usage_perc") == 0.0
