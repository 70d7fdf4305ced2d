"""Swap vs recompute vs no preemption give identical outputs; priority requests overtake the queue."""

from __future__ import annotations

import random

from pagedllm import LLM, SamplingParams
from tests.utils import metric

KWARGS = dict(device="cpu", block_size=4, max_model_len=96, max_num_seqs=16, max_num_batched_tokens=48,
              enable_prefix_caching=False)



def test_swap_recompute_and_no_preemption_agree(tiny_model):
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randint(2, 40))]} for _ in range(20)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(5, 25), ignore_eos=True) for _ in range(10)]
    params += [SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True) for i in range(10)]
    runs = {}
    for name, extra in {
        "roomy": dict(num_gpu_blocks_override=400),
        "recompute": dict(num_gpu_blocks_override=30, preemption_mode="recompute"),
        "swap": dict(num_gpu_blocks_override=30, preemption_mode="swap", swap_space=0.01),
    }.items():
        llm = LLM(tiny_model("llama"), **KWARGS, **extra)
        runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if name == "swap":
            assert metric(llm, "num_swap_preemptions_total") > 0
            assert metric(llm, "cpu_kv_cache_usage_perc") == 0.0 and metric(llm, "kv_cache_usage_perc") == 0.0
        if name == "recompute":
            assert metric(llm, "num_preemptions_total") > 0 and metric(llm, "num_swap_preemptions_total") == 0
    assert runs["swap"] == runs["roomy"] == runs["recompute"]


def test_priority_requests_finish_first_in_a_full_batch(tiny_model):
    llm = LLM(tiny_model("llama"), **{**KWARGS, "max_num_seqs": 2}, num_gpu_blocks_override=100,
              scheduling_policy="priority")
    prompts = [{"prompt_token_ids": [5 + i, 6, 7]} for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(prompts, params, priority=[5, 5, 5, 5, 0, 0], use_tqdm=False)
    finish_order = sorted(range(6), key=lambda i: outputs[i].metrics.finished_time)
    assert set(finish_order[:2]) == {4, 5}
    first_scheduled = sorted(range(6), key=lambda i: outputs[i].metrics.first_scheduled_time)
    assert set(first_scheduled[:2]) == {4, 5}  # all arrive together: the high-priority pair starts first
