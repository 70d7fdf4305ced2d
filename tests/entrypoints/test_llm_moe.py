"""Mixture-of-experts models (Qwen3-MoE, Mixtral): greedy parity with HF transformers in float32 on CPU inside a
busy batch with chunked prefill and preemption (the single-prompt case is in test_llm_parity.py with every tiny
variant), and the loader's and config's errors for what MoE checkpoints may get wrong."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.config import ModelConfig
from pagedllm.model.loader import build_model
from tests.entrypoints.conftest import hf_greedy
from tests.utils import build_tiny_model, load_hf_model, metric

MOE_VARIANTS = ["qwen3_moe", "mixtral"]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize("arch", MOE_VARIANTS)
def test_busy_batch_with_preemption_and_chunked_prefill_matches_hf(tiny_model, arch):
    model_dir = tiny_model(arch)
    # 24 blocks x 4 tokens cannot hold 24 requests of up to ~90 tokens: preemption must happen; a 48-token budget
    # splits the longer prompts into chunks, and steps mix prefill chunks with decodes.
    llm = LLM(model_dir, device="cpu", block_size=4, num_gpu_blocks_override=24, max_num_batched_tokens=48,
              max_num_seqs=16, max_model_len=96)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(1, 70))] for _ in range(24)]
    max_tokens = [random.Random(i).randint(1, 16) for i in range(24)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m) for m in max_tokens],
                           use_tqdm=False)
    assert metric(llm, "num_preemptions_total") > 0
    assert any(len(p) > 48 for p in prompts)
    hf_model = load_hf_model(model_dir)
    for prompt, limit, output in zip(prompts, max_tokens, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, limit)[0]
    assert metric(llm, "kv_cache_usage_perc") == 0.0


def _copy_model(src: str, dst: Path, drop: str | None = None, config_changes: dict | None = None) -> str:
    dst.mkdir()
    tensors = load_file(str(Path(src) / "model.safetensors"))
    save_file({name: t for name, t in tensors.items() if name != drop}, str(dst / "model.safetensors"))
    config = json.loads((Path(src) / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    return str(dst)


def test_missing_expert_weight_is_named(tmp_path):
    src = build_tiny_model(tmp_path, "mixtral")
    model_dir = _copy_model(src, tmp_path / "broken", drop="model.layers.1.block_sparse_moe.experts.5.w3.weight")
    with pytest.raises(ValueError, match=r"missing 1 weights: model\.layers\.1\.block_sparse_moe\.experts\.5\.w3"):
        LLM(model_dir, device="cpu", skip_tokenizer_init=True)


def test_checkpoint_with_more_experts_than_the_config_is_refused(tmp_path):
    src = build_tiny_model(tmp_path, "qwen3_moe")
    model_dir = _copy_model(src, tmp_path / "fewer", config_changes={"num_experts": 6, "num_local_experts": 6})
    with pytest.raises(ValueError, match=r"mlp\.gate\.weight': Shape mismatch: parameter \(6, 64\), checkpoint "
                                         r"tensor \(8, 64\)"):
        LLM(model_dir, device="cpu", skip_tokenizer_init=True)


@pytest.mark.parametrize(("changes", "message"), [
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size=64 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) must be between 1 and num_experts \(8\)"),
])
def test_unsupported_qwen3_moe_configs_are_refused(tmp_path, changes, message):
    src = build_tiny_model(tmp_path, "qwen3_moe")
    model_dir = _copy_model(src, tmp_path / "changed", config_changes=changes)
    with pytest.raises(ValueError, match=message):
        LLM(model_dir, device="cpu", skip_tokenizer_init=True, load_format="dummy")


def test_decoder_sparse_step_keeps_layers_off_the_grid_dense(tmp_path):
    model_dir = build_tiny_model(tmp_path, "qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2,
                                 mlp_only_layers=[3])  # sparse: layer 1 only (0 and 2 off the grid, 3 listed)
    llm = LLM(model_dir, device="cpu", skip_tokenizer_init=True, block_size=4, num_gpu_blocks_override=32,
              max_model_len=64)
    prompt = [5, 17, 42, 99, 7, 3, 25, 11]
    output = llm.generate({"prompt_token_ids": prompt}, greedy(12), use_tqdm=False)[0]
    assert output.outputs[0].token_ids == hf_greedy(load_hf_model(model_dir), prompt, 12)[0]
    model = build_model(ModelConfig.from_pretrained(model_dir, None), "meta")
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["LlamaMLP", "SparseMoeBlock", "LlamaMLP",
                                                                         "LlamaMLP"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", MOE_VARIANTS)
def test_fused_moe_in_cuda_graphs_matches_hf_in_float32(tiny_model, arch):
    """On CUDA the experts run the fused Triton kernels, decode steps inside CUDA graphs (padded batch sizes)."""
    model_dir = tiny_model(arch)
    llm = LLM(model_dir, device="cuda", dtype="float32", num_gpu_blocks_override=64, block_size=4,
              max_num_batched_tokens=32, max_num_seqs=8, max_model_len=128)
    assert llm.llm_engine.engine_core.model_runner.use_cuda_graphs
    prompts = [[5 + i, 17, 42, 99, 7, 3, 250, 11, 64][: 3 + i] * (1 + i % 3) for i in range(12)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(24), use_tqdm=False)
    hf_model = load_hf_model(model_dir)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 24)[0]
