"""Model loading: safetensors (single and sharded), name mapping, clear errors, dummy weights, dtypes, and a real
trained checkpoint (stories260K) against HF transformers."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm.config import SUPPORTED_ARCHITECTURES, ModelConfig
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.loader import get_model, torch_dtype
from pagedllm.model.registry import model_class as get_model_class
from tests.utils import STORIES, PagedRunner, build_tiny_model, load_hf_model


def load(model_dir: str, load_format: str = "auto", dtype: str = "float32") -> torch.nn.Module:
    return get_model(ModelConfig.from_pretrained(model_dir, None, dtype=dtype), load_format, "cpu")


def copy_model(model_dir: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def rewrite_weights(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_equals_single_file(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    sharded = Path(build_tiny_model(tmp_path, "qwen2", max_shard_size="40KB"))
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    single, multi = load(tiny_model_dir("qwen2")).state_dict(), load(str(sharded)).state_dict()
    assert single.keys() == multi.keys()
    for name in single:
        assert torch.equal(single[name], multi[name]), name


def test_model_in_eval_mode_with_fused_hf_names(tiny_model_dir: Callable[[str], str]) -> None:
    model = load(tiny_model_dir("qwen3"))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    names = {name for name, _ in model.named_parameters()}
    for expected in ("model.embed_tokens.weight", "model.layers.1.self_attn.qkv_proj.weight",
                     "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate_up_proj.weight",
                     "model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight",
                     "model.layers.1.post_attention_layernorm.weight", "model.layers.1.self_attn.q_norm.weight",
                     "model.layers.1.self_attn.k_norm.weight", "model.norm.weight", "lm_head.weight"):
        assert expected in names
    assert not any(p.requires_grad for p in model.parameters())


def test_tied_embeddings_share_one_tensor(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    model_dir = copy_model(tiny_model_dir("qwen3_tied"), tmp_path)
    model = load(str(model_dir))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Some tied checkpoints still carry lm_head.weight; old ones carry rotary inv_freq: both are skipped.
    rewrite_weights(model_dir, lambda t: t.update({
        "lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"]),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}))
    reloaded = load(str(model_dir))
    assert torch.equal(reloaded.lm_head.weight, model.model.embed_tokens.weight)


def test_missing_weight_is_named(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    model_dir = copy_model(tiny_model_dir("llama"), tmp_path)
    rewrite_weights(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 weights: model\.layers\.1\.self_attn\.k_proj\.weight"):
        load(str(model_dir))


def test_unexpected_weight_is_named(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    model_dir = copy_model(tiny_model_dir("llama"), tmp_path)
    rewrite_weights(model_dir, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"does not: model\.layers\.0\.self_attn\.extra\.weight"):
        load(str(model_dir))


def test_wrong_shape_is_named(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    model_dir = copy_model(tiny_model_dir("llama"), tmp_path)
    rewrite_weights(model_dir, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*Shape mismatch"):
        load(str(model_dir))


def test_missing_weight_files(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    model_dir = copy_model(tiny_model_dir("llama"), tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"No \*\.safetensors"):
        load(str(model_dir))
    sharded = Path(build_tiny_model(tmp_path, "llama", max_shard_size="40KB"))
    next(sharded.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(ValueError, match="do not exist"):
        load(str(sharded))


def test_dummy_weights_need_only_the_config(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    model_dir = copy_model(tiny_model_dir("qwen3"), tmp_path)
    (model_dir / "model.safetensors").unlink()
    model = load(str(model_dir), load_format="dummy", dtype="bfloat16")
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 32, 64)
    assert attn.o_proj.weight.shape == (64, 4 * 32)
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 96, 64)
    assert model.lm_head.weight.shape == (128, 64)
    # FP8 KV cache scales stay float32 (and 1.0: random weights have no scales).
    is_kv_scale = lambda name: name.endswith(("k_scale", "v_scale"))  # noqa: E731
    assert all(p.dtype == torch.bfloat16 for name, p in model.named_parameters() if not is_kv_scale(name))
    assert attn.k_scale.dtype == torch.float32 and attn.k_scale.item() == attn.v_scale.item() == 1.0
    assert torch.all(attn.q_norm.weight == 1) and torch.all(model.model.norm.weight == 1)
    assert 0.01 < attn.qkv_proj.weight.float().std() < 0.03
    again = load(str(model_dir), load_format="dummy", dtype="bfloat16")  # seeded: identical
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    logits = PagedRunner(model).step([("a", [5, 6, 7])])
    assert logits.shape == (3, 128) and torch.isfinite(logits).all()


def test_unsupported_architecture_lists_supported(tiny_model_dir: Callable[[str], str]) -> None:
    with pytest.raises(ValueError) as info:
        get_model_class("GPT2LMHeadModel")
    assert all(name in str(info.value) for name in SUPPORTED_ARCHITECTURES)
    config = dataclasses.replace(ModelConfig.from_pretrained(tiny_model_dir("llama"), None), architecture="Foo")
    with pytest.raises(ValueError, match="Unsupported model architecture 'Foo'.*LlamaForCausalLM"):
        get_model(config, "auto", "cpu")
    llama_family = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    assert all(get_model_class(name) is LlamaForCausalLM for name in llama_family)
    assert all(isinstance(get_model_class(name), type) for name in SUPPORTED_ARCHITECTURES)  # every module imports


def test_torch_dtype() -> None:
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("float16") is torch.float16
    assert torch_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="Unknown dtype"):
        torch_dtype("int8")




STORIES_REFERENCE = (  # from the asset's PROVENANCE.txt: HF greedy, float32, 60 new tokens
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a"
    " big, red ball. She wanted to play with it, but it was too high.\nLily"
)


@pytest.mark.skipif(not STORIES.is_dir(), reason="stories260K asset not available")
@torch.no_grad()
def test_stories260k_matches_hf() -> None:
    from transformers import AutoTokenizer

    model, hf = load(str(STORIES)), load_hf_model(str(STORIES))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokenizer = AutoTokenizer.from_pretrained(str(STORIES))
    ids = tokenizer("Once upon a time").input_ids
    runner = PagedRunner(model, block_size=16)
    logits = [runner.step([("a", ids)])[-1:]]
    generated = list(ids)
    for _ in range(60):  # greedy decode through the cache; HF recomputes the whole sequence below
        generated.append(int(logits[-1].argmax()))
        logits.append(runner.step([("a", generated[-1:])]))
    expected = hf(torch.tensor([generated])).logits[0, len(ids) - 1:].float()
    torch.testing.assert_close(torch.cat(logits), expected, atol=1e-4, rtol=0)
    assert tokenizer.decode(generated, skip_special_tokens=True) == STORIES_REFERENCE
