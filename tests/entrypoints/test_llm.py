"""The offline API end to end: sampling features, outputs, metrics, and bad input that leaves the LLM usable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.utils import load_hf_model, metric

PROMPT = {"prompt_token_ids": [5, 17, 42, 99, 7, 3, 250, 11, 64]}


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(tiny_model("llama"), device="cpu", block_size=4, num_gpu_blocks_override=128, max_model_len=128)



def assert_engine_idle(llm: LLM) -> None:
    engine = llm.llm_engine.engine_core
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache_manager.num_free_blocks == engine.num_blocks, "leaked KV blocks"
    assert not engine.model_runner.requests or not engine.scheduler.requests


def tokens(output) -> list[int]:
    return output.outputs[0].token_ids


def test_seeded_sampling_repeats_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(PROMPT, seeded, use_tqdm=False)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 5
    in_batch = llm.generate([{"prompt_token_ids": [9, 8, 7]}] * 5 + [PROMPT], others + [seeded], use_tqdm=False)[-1]
    assert tokens(alone) == tokens(in_batch)
    other_seed = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True),
                              use_tqdm=False)[0]
    assert tokens(other_seed) != tokens(alone)


def test_seeded_sampling_is_unchanged_by_preemption(tiny_model):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=25, ignore_eos=True)
    prompts = [{"prompt_token_ids": [3 + i, 40, 41, 42, 43, 44, 45]} for i in range(12)]
    roomy = LLM(tiny_model("llama"), device="cpu", block_size=4, num_gpu_blocks_override=200, max_model_len=64)
    tight = LLM(tiny_model("llama"), device="cpu", block_size=4, num_gpu_blocks_override=20, max_model_len=64)
    expected = [tokens(o) for o in roomy.generate(prompts, params, use_tqdm=False)]
    assert [tokens(o) for o in tight.generate(prompts, params, use_tqdm=False)] == expected
    assert metric(tight, "num_preemptions_total") > 0


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate(PROMPT, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    assert tokens(greedy[0]) == tokens(top1[0])


def test_logit_bias_bans_and_forces_tokens(llm):
    greedy = tokens(llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                 use_tqdm=False)[0])
    banned = greedy[0]
    output = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                 logit_bias={banned: -100}), use_tqdm=False)[0]
    assert banned not in tokens(output)
    forced = llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True,
                                                 logit_bias={77: 100}), use_tqdm=False)[0]
    assert tokens(forced) == [77] * 8


def test_stop_token_ids_and_max_tokens(llm):
    greedy = tokens(llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                 use_tqdm=False)[0])
    stop_id = greedy[3]
    output = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                 stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert output.token_ids == greedy[: greedy.index(stop_id) + 1]
    assert (output.finish_reason, output.stop_reason) == ("stop", stop_id)
    length = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert length[0].outputs[0].finish_reason == "length" and len(tokens(length[0])) == 4


def test_stop_strings_cut_the_text(llm):
    full = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == full[: full.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                                          include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == full[: full.index(stop) + len(stop)]
    assert_engine_idle(llm)


def test_text_prompt_is_tokenized_and_output_detokenized(llm):
    tokenizer = llm.get_tokenizer()
    output = llm.generate("Café déjà vu 😀", SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
                          use_tqdm=False)[0]
    assert output.prompt == "Café déjà vu 😀"
    assert output.prompt_token_ids == tokenizer.encode("Café déjà vu 😀")
    assert output.outputs[0].text == tokenizer.decode(tokens(output), skip_special_tokens=True)


def test_parallel_sampling_returns_n_completions(llm):
    output = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    assert_engine_idle(llm)


def test_logprobs_top_n_with_ranks(llm):
    completion = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=3, max_tokens=5, logprobs=3,
                                                     ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(completion.logprobs) == 5
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        assert token_id in entry and len(entry) in (3, 4)  # the sampled token, plus the top 3 (may overlap)
        top = sorted((lp for tid, lp in entry.items() if lp.rank <= 3), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3]
        assert top[0].logprob >= top[1].logprob >= top[2].logprob
        assert entry[token_id].rank >= 1 and isinstance(entry[token_id].decoded_token, str)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(completion.token_ids,
                                                                                            completion.logprobs)))


def test_prompt_logprobs_match_hf(tiny_model, llm):
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 2, 18]
    # A 4-token budget forces the prompt through several chunks.
    chunked = LLM(tiny_model("llama"), device="cpu", block_size=4, num_gpu_blocks_override=64,
                  max_num_batched_tokens=4, max_num_seqs=4, max_model_len=128)
    for engine in (llm, chunked):
        output = engine.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=2),
                                 use_tqdm=False)[0]
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
        with torch.no_grad():
            hf_logits = load_hf_model(tiny_model("llama"))(torch.tensor([prompt])).logits[0].float()
        hf_logprobs = torch.log_softmax(hf_logits, dim=-1)
        for position in range(1, len(prompt)):
            entry = output.prompt_logprobs[position]
            assert abs(entry[prompt[position]].logprob - float(hf_logprobs[position - 1, prompt[position]])) < 1e-4
            assert 2 <= len(entry) <= 3


def test_chat_uses_the_chat_template(llm):
    messages = [{"role": "user", "content": "Hello there"}]
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert output.prompt == expected == "user: Hello there\nassistant:"
    assert len(tokens(output)) == 5


def test_metrics_have_vllm_names(llm):
    before = metric(llm, "generation_tokens_total")
    llm.generate([PROMPT] * 3, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    names = {m.name for m in llm.get_metrics()}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "prompt_tokens_total", "generation_tokens_total"):
        assert "pagedllm:" + name in names
    assert metric(llm, "generation_tokens_total") == before + 12
    assert metric(llm, "num_requests_running") == 0 and metric(llm, "kv_cache_usage_perc") == 0


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ({"prompt_token_ids": []}, SamplingParams(), "empty"),
        ("", SamplingParams(), "empty"),
        ({"prompt_token_ids": [1] * 128}, SamplingParams(), "maximum context length"),
        ({"prompt_token_ids": [1, 2, 320]}, SamplingParams(), "out of vocabulary"),
        ({"prompt_token_ids": [1, -1]}, SamplingParams(), "out of vocabulary"),
        ({"prompt_token_ids": [1, 2]}, SamplingParams(logit_bias={10_000: 1.0}), "logit_bias"),
        ({"prompt_token_ids": [1, 2]}, SamplingParams(stop_token_ids=[10_000]), "stop_token_ids"),
        ({"prompt_token_ids": "abc"}, SamplingParams(), "prompt_token_ids"),
        (42, SamplingParams(), "prompt"),
    ],
)
def test_bad_input_raises_before_any_work_and_the_llm_keeps_serving(llm, prompt, params, message):
    good = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match=message):
        llm.generate([good, prompt], params, use_tqdm=False)
    assert_engine_idle(llm)
    output = llm.generate(good, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(tokens(output[0])) == 3
    assert_engine_idle(llm)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_list_must_match_prompts(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([PROMPT, PROMPT], [SamplingParams()] * 3, use_tqdm=False)


def test_engine_errors(tiny_model, tmp_path):
    model_dir = Path(tiny_model("llama"))
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(model_dir), device="cpu", max_model_len=10_000)
    with pytest.raises(ValueError, match="KV cache holds"):
        LLM(str(model_dir), device="cpu", block_size=4, num_gpu_blocks_override=2)
    with pytest.raises(ValueError, match="neither a local directory"):
        LLM(str(tmp_path / "missing-model"), device="cpu")
    bad = tmp_path / "gpt2"
    bad.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="pagedllm supports: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(bad), device="cpu")


def test_dummy_weights_without_tokenizer(tiny_model):
    llm = LLM(tiny_model("qwen3"), device="cpu", load_format="dummy", skip_tokenizer_init=True,
              num_gpu_blocks_override=32, max_model_len=64)
    output = llm.generate(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(tokens(output)) == 5 and output.outputs[0].text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


def test_without_chunked_prefill(tiny_model):
    llm = LLM(tiny_model("llama"), device="cpu", enable_chunked_prefill=False, max_model_len=64,
              num_gpu_blocks_override=64, block_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    reference = LLM(tiny_model("llama"), device="cpu", max_model_len=64, num_gpu_blocks_override=64, block_size=4)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 12)]
    assert [tokens(o) for o in llm.generate(prompts, greedy, use_tqdm=False)] == [
        tokens(o) for o in reference.generate(prompts, greedy, use_tqdm=False)
    ]
