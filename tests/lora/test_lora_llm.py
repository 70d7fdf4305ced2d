"""Multi-LoRA through ``LLM``: greedy outputs equal HF transformers + PEFT (adapter merged) token for token in float32
on CPU, alone and in one batch mixing the base model and 4 adapters with 2 slots (swapping) under preemption; prefix
caching never shares KV between adapters; every bad adapter is a clear error and the engine keeps serving."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pagedllm import LLM, LoRARequest, SamplingParams
from tests.entrypoints.conftest import hf_greedy
from tests.lora.conftest import ADAPTER_SPECS, peft_merged_model
from tests.utils import load_hf_model, metric

pytest.importorskip("peft")


def greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def assert_engine_idle(llm: LLM) -> None:
    engine = llm.llm_engine.engine_core
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache_manager.num_free_blocks == engine.num_blocks, "leaked KV blocks"


def random_prompts(num: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(2, 40))] for _ in range(num)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("adapter", ["all_r8", "mlp_r16_rslora"])
def test_single_adapter_matches_peft(lora_base, lora_adapter, arch, adapter):
    base_dir, adapter_dir = lora_base(arch), lora_adapter(arch, adapter)
    llm = LLM(base_dir, device="cpu", block_size=4, num_gpu_blocks_override=64, enable_lora=True, max_lora_rank=16)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64]
    output = llm.generate({"prompt_token_ids": prompt}, greedy(16, logprobs=1), use_tqdm=False,
                          lora_request=LoRARequest(adapter, 1, adapter_dir))[0]
    hf_tokens, hf_logprobs = hf_greedy(peft_merged_model(base_dir, adapter_dir), prompt, 16)
    base_tokens, _ = hf_greedy(load_hf_model(base_dir), prompt, 16)
    completion = output.outputs[0]
    assert completion.token_ids == hf_tokens
    assert hf_tokens != base_tokens  # the adapter does change the model
    ours = [completion.logprobs[i][token].logprob for i, token in enumerate(hf_tokens)]
    assert max(abs(a - b) for a, b in zip(ours, hf_logprobs)) < 1e-4
    assert_engine_idle(llm)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_batch_of_base_and_four_adapters_with_swapping_and_preemption(lora_base, lora_adapter, arch):
    base_dir = lora_base(arch)
    names = sorted(ADAPTER_SPECS)
    adapters = [LoRARequest(name, index + 1, lora_adapter(arch, name)) for index, name in enumerate(names)]
    # 2 slots and 2 adapters on the CPU for 4 adapters: slots are swapped and adapters re-read from disk; 20 blocks of
    # 4 tokens cannot hold 20 requests of up to ~56 tokens: preemption; a 32-token budget chunks the prefills.
    llm = LLM(base_dir, device="cpu", block_size=4, num_gpu_blocks_override=20, max_num_batched_tokens=32,
              max_num_seqs=8, max_model_len=64, enable_lora=True, max_loras=2, max_cpu_loras=2)
    prompts = random_prompts(20)
    choice = [None, *adapters]
    lora_requests = [choice[index % 5] for index in range(20)]
    max_tokens = [random.Random(i).randint(1, 16) for i in range(20)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m, logprobs=0) for m in max_tokens],
                           use_tqdm=False, lora_request=lora_requests)
    assert metric(llm, "num_preemptions_total") > 0
    pool = llm.llm_engine.engine_core.model_runner.lora
    assert pool.num_slot_loads > 4  # adapters left their slot and came back
    references = {None: load_hf_model(base_dir)}
    references.update({a.lora_int_id: peft_merged_model(base_dir, a.lora_path) for a in adapters})
    for prompt, limit, lora, output in zip(prompts, max_tokens, lora_requests, outputs):
        hf_model = references[None if lora is None else lora.lora_int_id]
        hf_tokens, hf_logprobs = hf_greedy(hf_model, prompt, limit)
        completion = output.outputs[0]
        assert completion.token_ids == hf_tokens, (lora, prompt)
        ours = [completion.logprobs[i][token].logprob for i, token in enumerate(hf_tokens)]
        assert max(abs(a - b) for a, b in zip(ours, hf_logprobs)) < 1e-4
    assert_engine_idle(llm)


def test_batch_equals_each_request_alone(lora_base, lora_adapter):
    base_dir = lora_base("llama")
    adapters = [LoRARequest(name, index + 1, lora_adapter("llama", name))
                for index, name in enumerate(["all_r8", "attn_r4", "ko_r2"])]
    llm = LLM(base_dir, device="cpu", block_size=4, num_gpu_blocks_override=128, enable_lora=True, max_loras=4)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(8, seed=3)]
    loras = [None, *adapters] * 2
    together = llm.generate(prompts, greedy(10), use_tqdm=False, lora_request=loras)
    for prompt, lora, output in zip(prompts, loras, together):
        alone = llm.generate(prompt, greedy(10), use_tqdm=False, lora_request=lora)[0]
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in together[:4]}) == 4  # four different models
    assert_engine_idle(llm)


def test_prefix_cache_never_shares_kv_between_adapters(lora_base, lora_adapter):
    base_dir = lora_base("llama")
    first = LoRARequest("all_r8", 1, lora_adapter("llama", "all_r8"))
    second = LoRARequest("all_r8-copy", 2, lora_adapter("llama", "all_r8", seed=77))
    llm = LLM(base_dir, device="cpu", block_size=4, num_gpu_blocks_override=128, enable_lora=True)
    prompt = {"prompt_token_ids": random_prompts(1, seed=5)[0] + list(range(10, 40))}

    def run(lora: LoRARequest | None) -> tuple[list[int], float]:
        hits = metric(llm, "prefix_cache_hits_total")
        tokens = llm.generate(prompt, greedy(8), use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids
        return tokens, metric(llm, "prefix_cache_hits_total") - hits

    first_tokens, first_hits = run(first)
    assert first_hits == 0
    assert run(first) == (first_tokens, pytest.approx(len(prompt["prompt_token_ids"]) // 4 * 4, abs=4))
    second_tokens, second_hits = run(second)
    base_tokens, base_hits = run(None)
    assert second_hits == 0 and base_hits == 0
    hf_first = hf_greedy(peft_merged_model(base_dir, first.lora_path), prompt["prompt_token_ids"], 8)[0]
    hf_second = hf_greedy(peft_merged_model(base_dir, second.lora_path), prompt["prompt_token_ids"], 8)[0]
    assert (first_tokens, second_tokens) == (hf_first, hf_second)
    assert base_tokens == hf_greedy(load_hf_model(base_dir), prompt["prompt_token_ids"], 8)[0]
    assert_engine_idle(llm)


# ---- errors ------------------------------------------------------------------------------------------------------


def broken_copy(adapter_dir: str, tmp_path: Path, change) -> str:
    target = tmp_path / "broken"
    shutil.copytree(adapter_dir, target)
    change(target)
    return str(target)


def edit_config(**changes):
    def change(directory: Path) -> None:
        config_file = directory / "adapter_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))

    return change


@pytest.fixture(scope="module")
def llama_lora_llm(lora_base) -> LLM:
    return LLM(lora_base("llama"), device="cpu", block_size=4, num_gpu_blocks_override=64, enable_lora=True,
               max_lora_rank=8)


@pytest.mark.parametrize(("case", "message"), [
    ("missing_dir", "not a directory"),
    ("no_config", "no adapter_config.json"),
    ("no_weights", "no adapter weights"),
    ("rank_over_limit", "above max_lora_rank=8"),
    ("unknown_target", "do not exist in this model"),
    ("embedding_target", "embeddings or lm_head"),
    ("other_model", "do not match the base model"),
    ("dora", "DoRA is not supported"),
    ("modules_to_save", "modules_to_save"),
    ("lora_bias", "bias"),
])
def test_bad_adapter_is_a_clear_error_and_the_engine_keeps_serving(llama_lora_llm, lora_adapter, tmp_path, case,
                                                                   message):
    good = lora_adapter("llama", "attn_r4")
    path = {
        "missing_dir": lambda: str(tmp_path / "nothing-here"),
        "no_config": lambda: broken_copy(good, tmp_path, lambda d: (d / "adapter_config.json").unlink()),
        "no_weights": lambda: broken_copy(good, tmp_path, lambda d: (d / "adapter_model.safetensors").unlink()),
        "rank_over_limit": lambda: lora_adapter("llama", "mlp_r16_rslora"),
        "unknown_target": lambda: broken_copy(good, tmp_path, edit_config(target_modules=["q_proj", "fc1"])),
        "embedding_target": lambda: broken_copy(good, tmp_path, edit_config(target_modules=["embed_tokens"])),
        "other_model": lambda: lora_adapter("qwen3", "attn_r4"),  # head_dim 32: q/v shapes differ
        "dora": lambda: broken_copy(good, tmp_path, edit_config(use_dora=True)),
        "modules_to_save": lambda: broken_copy(good, tmp_path, edit_config(modules_to_save=["lm_head"])),
        "lora_bias": lambda: broken_copy(good, tmp_path, edit_config(bias="all")),
    }[case]()
    with pytest.raises(ValueError, match=message):
        llama_lora_llm.generate("hello", greedy(4), use_tqdm=False, lora_request=LoRARequest("bad", 50, path))
    output = llama_lora_llm.generate("hello", greedy(4), use_tqdm=False, lora_request=LoRARequest("good", 1, good))
    assert len(output[0].outputs[0].token_ids) == 4
    assert_engine_idle(llama_lora_llm)


def test_request_errors(llama_lora_llm, lora_base, lora_adapter):
    good = lora_adapter("llama", "attn_r4")
    llama_lora_llm.generate("hi", greedy(2), use_tqdm=False, lora_request=LoRARequest("good", 1, good))
    with pytest.raises(ValueError, match="already names adapter"):
        llama_lora_llm.generate("hi", greedy(2), use_tqdm=False,
                                lora_request=LoRARequest("other", 1, lora_adapter("llama", "all_r8")))
    with pytest.raises(ValueError, match="lora_requests for 2 prompts"):
        llama_lora_llm.generate(["a", "b"], greedy(2), use_tqdm=False, lora_request=[None])
    with pytest.raises(ValueError, match="lora_int_id must be"):
        LoRARequest("x", 0, good)
    plain = LLM(lora_base("llama"), device="cpu", block_size=4, num_gpu_blocks_override=16, max_model_len=64)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.generate("hi", greedy(2), use_tqdm=False, lora_request=LoRARequest("good", 1, good))


def test_chat_with_an_adapter(llama_lora_llm, lora_adapter):
    lora = LoRARequest("good", 1, lora_adapter("llama", "attn_r4"))
    messages = [{"role": "user", "content": "Once upon a time"}]
    with_adapter = llama_lora_llm.chat(messages, greedy(6), use_tqdm=False, lora_request=lora)[0]
    prompt = {"prompt_token_ids": with_adapter.prompt_token_ids}
    assert with_adapter.outputs[0].token_ids == llama_lora_llm.generate(
        prompt, greedy(6), use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids


def test_kernel_paths_in_the_engine_match_the_torch_path(lora_base, lora_adapter, monkeypatch):
    """The engine with the Triton kernels (Triton's interpreter on CPU), over tiles of 16 tokens (decode steps) and of
    64 (prefills), gives the torch path's tokens."""
    base_dir = lora_base("qwen3")
    adapters = [LoRARequest(name, index + 1, lora_adapter("qwen3", name))
                for index, name in enumerate(["all_r8", "mlp_r16_rslora"])]
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, seed=11)]
    loras = [None, *adapters] * 2

    def run(kernels: bool) -> list[list[int]]:
        llm = LLM(base_dir, device="cpu", block_size=4, num_gpu_blocks_override=128, max_num_batched_tokens=48,
                  max_num_seqs=8, enable_lora=True, max_loras=2, max_lora_rank=16)
        pool = llm.llm_engine.engine_core.model_runner.lora
        pool.kernels_available = kernels
        outputs = llm.generate(prompts, greedy(6), use_tqdm=False, lora_request=loras)
        return [o.outputs[0].token_ids for o in outputs]

    from pagedllm.lora import punica, tiles

    step_sizes = []

    def counted(y, x, *args, _add=punica.add_lora):
        step_sizes.append(x.shape[0])
        return _add(y, x, *args)

    monkeypatch.setattr(punica, "add_lora", counted)
    monkeypatch.setattr(tiles, "SMALL_STEP_TOKENS", 8)  # decode steps cut tiles of 16 tokens, prefills of 64
    with_kernels = run(kernels=True)
    assert min(step_sizes) <= 8 < max(step_sizes)
    assert with_kernels == run(kernels=False)


def test_removed_adapter_is_dropped_once_its_running_request_finishes(llama_lora_llm, lora_adapter):
    engine = llama_lora_llm.llm_engine
    slots = engine.engine_core.model_runner.lora
    lora = LoRARequest("leaving", 501, lora_adapter("llama", "all_r8"))
    engine.add_request("unload-1", {"prompt_token_ids": [5, 17, 42]}, greedy(12), lora_request=lora)
    engine.step()
    assert slots.holds(501)
    engine.remove_lora(501)  # the request still runs: its adapter stays until it ends
    assert slots.holds(501)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert next(o for o in outputs if o.finished).outputs[0].finish_reason == "length"
    assert not slots.holds(501)
    # Not running: dropped at once.
    llama_lora_llm.generate({"prompt_token_ids": [5, 17]}, greedy(2), use_tqdm=False,
                            lora_request=LoRARequest("idle", 502, lora_adapter("llama", "all_r8")))
    assert slots.holds(502)
    engine.remove_lora(502)
    assert not slots.holds(502)
    assert_engine_idle(llama_lora_llm)
