"""The FP8 KV cache through the whole engine on CPU: flags and errors, the cache's size, scales from a checkpoint
or from the first step, swap preemption, and how often greedy decoding agrees with the float cache."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.config import CacheConfig, ModelConfig
from pagedllm.entrypoints.engine_args import add_engine_args, engine_kwargs_from_cli
from pagedllm.model import llama
from pagedllm.model.loader import get_model
from tests.utils import metric

KWARGS = dict(device="cpu", block_size=4, max_model_len=128, max_num_seqs=16, enable_prefix_caching=False,
              skip_tokenizer_init=True)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(count: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, 120, (int(length),), generator=generator).tolist()}
            for length in torch.randint(3, 30, (count,), generator=generator)]


def runner(llm: LLM):
    return llm.llm_engine.engine_core.model_runner


def attention_layers(llm: LLM) -> list:
    return [layer.self_attn for layer in runner(llm).model.model.layers]


def test_unknown_cache_dtype_is_a_clear_error(tiny_model) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8'.*auto, bfloat16, fp8, fp8_e4m3, fp8_e5m2"):
        LLM(tiny_model("llama"), kv_cache_dtype="int8", **KWARGS)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(cache_dtype="float8")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int8"])


def test_flags_reach_the_engine_arguments() -> None:
    """``serve``, ``generate`` and ``bench`` all build the engine from these kwargs."""
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    kwargs = engine_kwargs_from_cli(parser.parse_args(["--kv-cache-dtype", "fp8_e5m2", "--calculate-kv-scales"]))
    assert kwargs["kv_cache_dtype"] == "fp8_e5m2" and kwargs["calculate_kv_scales"] is True
    defaults = engine_kwargs_from_cli(parser.parse_args([]))
    assert defaults["kv_cache_dtype"] == "auto" and defaults["calculate_kv_scales"] is False


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_cache_holds_twice_the_blocks_of_bfloat16(tiny_model, cache_dtype: str) -> None:
    budget = dict(kv_cache_memory_bytes=1 << 20, max_num_seqs=256)
    bf16 = LLM(tiny_model("llama"), dtype="bfloat16", **{**KWARGS, **budget})
    fp8 = LLM(tiny_model("llama"), dtype="bfloat16", kv_cache_dtype=cache_dtype, **{**KWARGS, **budget})
    bf16_report, fp8_report = (llm.llm_engine.engine_core.startup_report for llm in (bf16, fp8))
    assert fp8_report["num_gpu_blocks"] == 2 * bf16_report["num_gpu_blocks"]
    assert fp8_report["kv_cache_tokens"] == 2 * bf16_report["kv_cache_tokens"]
    expected_dtype = "float8_e5m2" if cache_dtype == "fp8_e5m2" else "float8_e4m3fn"
    assert fp8_report["kv_cache_dtype"] == expected_dtype and bf16_report["kv_cache_dtype"] == "bfloat16"
    assert runner(fp8).kv_caches[0].dtype == getattr(torch, expected_dtype)
    assert fp8.llm_engine.config.kv_bytes_per_token * 2 == bf16.llm_engine.config.kv_bytes_per_token


def teacher_forced_top1(llm: LLM, sequences: list[list[int]]) -> list[list[int]]:
    """The model's greedy choice at every position of each sequence, the sequence itself being the context."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    return [[next(t for t, lp in entry.items() if lp.rank == 1) for entry in out.prompt_logprobs[1:]]
            for out in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_mostly_agrees_with_the_float_cache(tiny_model, arch: str) -> None:
    """Measured, not exact: teacher-forced top-1 agreement of the FP8 cache with the float32 cache on a tiny
    float32 model (random weights: flat distributions, so near-ties flip more often than in a trained model)."""
    float_llm = LLM(tiny_model(arch), **KWARGS)
    fp8_llm = LLM(tiny_model(arch), kv_cache_dtype="fp8", calculate_kv_scales=True, **KWARGS)
    outputs = float_llm.generate(prompts(8), SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                                 use_tqdm=False)
    sequences = [o.prompt_token_ids + o.outputs[0].token_ids for o in outputs]
    reference, fp8 = teacher_forced_top1(float_llm, sequences), teacher_forced_top1(fp8_llm, sequences)
    pairs = [(a, b) for ref_row, fp8_row in zip(reference, fp8) for a, b in zip(ref_row, fp8_row)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    print(f"{arch}: teacher-forced top-1 agreement fp8 vs float32 cache {agreement:.3f} over {len(pairs)} positions")
    assert agreement >= 0.9
    free_running = [o.outputs[0].token_ids for o in fp8_llm.generate(prompts(8), GREEDY, use_tqdm=False)]
    assert all(len(tokens) == GREEDY.max_tokens for tokens in free_running)


def write_scales(model_dir: str, target: Path, names: tuple[str, str], values: dict[int, tuple[float, float]]) -> str:
    """A copy of the checkpoint with K/V scales added under ``names`` (e.g. ("self_attn.k_scale", ...))."""
    shutil.copytree(model_dir, target)
    weights = load_file(str(target / "model.safetensors"))
    for layer, (k_value, v_value) in values.items():
        weights[f"model.layers.{layer}.{names[0]}"] = torch.tensor(k_value)
        weights[f"model.layers.{layer}.{names[1]}"] = torch.tensor([v_value])  # some writers store shape [1]
    save_file(weights, str(target / "model.safetensors"))
    return str(target)


@pytest.mark.parametrize("names", [("self_attn.k_scale", "self_attn.v_scale"),
                                   ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale")])
def test_scales_load_from_the_checkpoint(tiny_model, tmp_path: Path, names: tuple[str, str]) -> None:
    values = {0: (0.02, 0.01), 1: (0.03, 0.005)}
    model_dir = write_scales(tiny_model("llama"), tmp_path / "scaled", names, values)
    model = get_model(ModelConfig.from_pretrained(model_dir, None, dtype="float32"), "auto", "cpu")
    for layer, (k_value, v_value) in values.items():
        attn = model.model.layers[layer].self_attn
        assert attn.k_scale.item() == pytest.approx(k_value) and attn.v_scale.item() == pytest.approx(v_value)
    llm = LLM(model_dir, kv_cache_dtype="fp8", **KWARGS)
    assert attention_layers(llm)[1].k_scale.item() == pytest.approx(0.03)
    assert all(len(o.outputs[0].token_ids) == 24 for o in llm.generate(prompts(3), GREEDY, use_tqdm=False))


def test_checkpoint_without_scales_loads_with_scale_one(tiny_model) -> None:
    llm = LLM(tiny_model("qwen3"), kv_cache_dtype="fp8", **KWARGS)
    assert all(a.k_scale.item() == a.v_scale.item() == 1.0 for a in attention_layers(llm))


def test_calculate_kv_scales_sets_them_once_from_the_first_step(tiny_model, monkeypatch) -> None:
    seen = []
    calibrate = llama.calibrate_kv_scales

    def recording(key, value, k_scale, v_scale, cache_dtype):
        seen.append((key.abs().max().item() / 448, value.abs().max().item() / 448))
        calibrate(key, value, k_scale, v_scale, cache_dtype)

    monkeypatch.setattr(llama, "calibrate_kv_scales", recording)
    llm = LLM(tiny_model("qwen3"), kv_cache_dtype="fp8", calculate_kv_scales=True, **KWARGS)
    llm.generate(prompts(4), GREEDY, use_tqdm=False)
    layers = attention_layers(llm)
    assert len(seen) == len(layers)  # once per layer: the first step only
    for attn, (k_expected, v_expected) in zip(layers, seen):
        assert attn.k_scale.item() == pytest.approx(k_expected) and attn.v_scale.item() == pytest.approx(v_expected)
    before = [a.k_scale.item() for a in layers]
    llm.generate(prompts(2, seed=1), GREEDY, use_tqdm=False)
    assert [a.k_scale.item() for a in layers] == before


def test_bfloat16_cache_under_a_float32_model(tiny_model) -> None:
    """kv_cache_dtype="bfloat16" (the reference of the FP8 accuracy figures): a float32 model over a bf16 cache."""
    llm = LLM(tiny_model("llama"), kv_cache_dtype="bfloat16", **KWARGS)
    assert llm.llm_engine.config.model_config.dtype == "float32" and runner(llm).kv_caches[0].dtype == torch.bfloat16
    assert all(len(o.outputs[0].token_ids) == 24 for o in llm.generate(prompts(3), GREEDY, use_tqdm=False))


def test_calculate_kv_scales_is_a_no_op_with_a_float_cache(tiny_model) -> None:
    llm = LLM(tiny_model("llama"), calculate_kv_scales=True, **KWARGS)
    llm.generate(prompts(2), GREEDY, use_tqdm=False)
    assert all(a.k_scale.item() == 1.0 for a in attention_layers(llm))


def test_swap_preemption_with_an_fp8_cache_keeps_outputs(tiny_model) -> None:
    common = dict(KWARGS, kv_cache_dtype="fp8", max_num_batched_tokens=48, max_model_len=96)
    batch = prompts(16, seed=2)
    roomy = LLM(tiny_model("llama"), num_gpu_blocks_override=400, **common)
    swapping = LLM(tiny_model("llama"), num_gpu_blocks_override=30, preemption_mode="swap", swap_space=0.01, **common)
    assert runner(swapping).cpu_kv_caches[0].dtype == torch.float8_e4m3fn
    expected = [o.outputs[0].token_ids for o in roomy.generate(batch, GREEDY, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in swapping.generate(batch, GREEDY, use_tqdm=False)] == expected
    assert metric(swapping, "num_swap_preemptions_total") > 0


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_cache_on_cuda_graphs_match_eager_steps_and_swap(tiny_model, cache_dtype: str) -> None:
    """On CUDA: the Triton kernels over an FP8 cache, decode steps replayed from CUDA graphs after the scales were
    computed (first step, eager) give the tokens of the same engine run eagerly; swapping through pinned FP8 host
    memory keeps them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    common = dict(device="cuda", dtype="float32", block_size=4, max_model_len=96, max_num_seqs=16,
                  max_num_batched_tokens=48, skip_tokenizer_init=True, kv_cache_dtype=cache_dtype,
                  calculate_kv_scales=True, enable_prefix_caching=False)
    batch = prompts(16, seed=2)  # 30 blocks of 4 tokens cannot hold them all at once: preemptions
    graphed = LLM(tiny_model("qwen3"), num_gpu_blocks_override=256, **common)
    assert runner(graphed).use_cuda_graphs and runner(graphed).kv_caches[0].dtype.itemsize == 1
    expected = [o.outputs[0].token_ids for o in graphed.generate(batch, GREEDY, use_tqdm=False)]
    assert all(a.k_scale.item() != 1.0 for a in attention_layers(graphed))
    eager = LLM(tiny_model("qwen3"), num_gpu_blocks_override=256, enforce_eager=True, **common)
    assert [o.outputs[0].token_ids for o in eager.generate(batch, GREEDY, use_tqdm=False)] == expected
    swapping = LLM(tiny_model("qwen3"), num_gpu_blocks_override=30, preemption_mode="swap", swap_space=0.01,
                   **common)
    assert [o.outputs[0].token_ids for o in swapping.generate(batch, GREEDY, use_tqdm=False)] == expected
    assert metric(swapping, "num_swap_preemptions_total") > 0


@pytest.mark.gpu
def test_fp8_cache_on_cuda_mostly_agrees_with_bfloat16(tiny_model) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # A byte budget, not gpu_memory_utilization: the second engine's share would count the first one's cache.
    common = dict(device="cuda", dtype="bfloat16", max_model_len=256, skip_tokenizer_init=True,
                  kv_cache_memory_bytes=64 << 20)
    bf16 = LLM(tiny_model("llama"), **common)
    fp8 = LLM(tiny_model("llama"), kv_cache_dtype="fp8", calculate_kv_scales=True, **common)
    outputs = bf16.generate(prompts(8), SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), use_tqdm=False)
    sequences = [o.prompt_token_ids + o.outputs[0].token_ids for o in outputs]
    pairs = [(a, b) for r, f in zip(teacher_forced_top1(bf16, sequences), teacher_forced_top1(fp8, sequences))
             for a, b in zip(r, f)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    print(f"cuda: teacher-forced top-1 agreement fp8 vs bf16 cache {agreement:.3f} over {len(pairs)} positions")
    assert agreement >= 0.9
