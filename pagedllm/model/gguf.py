"""GGUF checkpoints (llama.cpp's single-file format): config, weights and tokenizer from one ``.gguf`` file.

A GGUF file is its own ``config.json``: ``gguf_to_hf_config`` turns its metadata into the dict that
``ModelConfig.from_dict`` reads, and ``iterate_gguf_weights`` yields its tensors under Hugging Face names,
dequantized to float one at a time, so the usual ``load_weights`` fills the model. The tokenizer is built by
transformers from the same file (``load_gguf_tokenizer``).

The header is parsed here, not with ``gguf.GGUFReader``: the reader makes a numpy view per element of the
50k-entry token list and takes seconds on a 135M model; this parser takes milliseconds. The ``gguf`` package
is still used for what it is good at: the quantization block sizes and ``gguf.quants.dequantize``.

This module imports no torch, numpy or gguf at import time: ``pagedllm.config`` reads GGUF metadata through it.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# llama.cpp architecture -> HF architecture. Mistral files say "llama" too, and run as Llama here.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp stores Llama q/k rows interleaved for its rotary kernel; Qwen files keep HF's (NeoX) order.
_PERMUTED_QK_ARCHITECTURES = ("llama",)
# Fixed-size metadata value types (GGUF spec): type id -> struct format.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors the config consumes instead of the model (Llama 3 rotary scaling factors).
_ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes are in the file and how they are encoded."""

    name: str
    shape: tuple[int, ...]  # torch order (outermost first): GGUF lists dimensions innermost first
    ggml_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata (key -> value) and tensor directory."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def arch_value(self, key: str, default: Any = None) -> Any:
        """Metadata under the architecture's prefix, e.g. ``arch_value("block_count")`` -> ``llama.block_count``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


# ---- finding the file --------------------------------------------------------------------------------------------


def find_gguf_file(path: str | os.PathLike[str]) -> Path | None:
    """The ``.gguf`` file that ``path`` designates, or None: the file itself, or the only ``.gguf`` in a directory
    that holds no Hugging Face checkpoint (config.json or safetensors, which take precedence)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists() or any(path.glob("*.safetensors")):
        return None
    files = sorted(path.glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def is_gguf_model(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``.gguf`` file, or a directory holding exactly one and no config.json/safetensors."""
    return find_gguf_file(path) is not None


def _gguf_path(path: str | os.PathLike[str]) -> Path:
    found = find_gguf_file(path)
    if found is None:
        raise ValueError(f"{str(path)!r} is not a .gguf file nor a directory holding exactly one")
    return found


# ---- reading the header ------------------------------------------------------------------------------------------


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the metadata and tensor directory of a (little-endian, version 2 or 3) GGUF file."""
    path = _gguf_path(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{str(path)!r} is not a GGUF file (bad magic)")
        version, num_tensors, num_kv = struct.unpack("<IQQ", f.read(20))
        if version not in (2, 3):
            raise ValueError(f"{str(path)!r}: unsupported GGUF version {version} (expected 2 or 3, little-endian)")
        metadata = {_read_string(f): _read_value(f, _read_u32(f)) for _ in range(num_kv)}
        infos = [_read_tensor_info(f) for _ in range(num_tensors)]
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-f.tell() // alignment) * alignment
    tensors = {
        name: GGUFTensorInfo(name, shape, ggml_type, data_start + offset) for name, shape, ggml_type, offset in infos
    }
    return GGUFHeader(str(path), metadata, tensors)


def _read_u32(f: BinaryIO) -> int:
    return struct.unpack("<I", f.read(4))[0]


def _read_u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", f.read(8))[0]


def _read_string(f: BinaryIO) -> str:
    return f.read(_read_u64(f)).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, value_type: int) -> Any:
    if value_type == _STRING:
        return _read_string(f)
    if value_type == _ARRAY:
        item_type, count = _read_u32(f), _read_u64(f)
        if item_type in _SCALAR_FORMATS:  # one unpack for the whole array: token types, scores...
            fmt = _SCALAR_FORMATS[item_type][1]
            return list(struct.unpack(f"<{count}{fmt}", f.read(count * struct.calcsize(fmt))))
        return [_read_value(f, item_type) for _ in range(count)]
    if value_type not in _SCALAR_FORMATS:
        raise ValueError(f"Unknown GGUF metadata value type {value_type}")
    fmt = _SCALAR_FORMATS[value_type]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _read_tensor_info(f: BinaryIO) -> tuple[str, tuple[int, ...], int, int]:
    name = _read_string(f)
    num_dims = _read_u32(f)
    dims = struct.unpack(f"<{num_dims}Q", f.read(8 * num_dims))
    ggml_type, offset = _read_u32(f), _read_u64(f)
    return name, tuple(reversed(dims)), ggml_type, offset


# ---- config --------------------------------------------------------------------------------------------------------


def gguf_to_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An HF ``config.json``-like dict (what ``ModelConfig.from_dict`` reads) from a GGUF file's metadata."""
    header = read_gguf_header(path)
    arch = header.architecture
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"Unsupported GGUF architecture {arch!r} in {header.path!r}; supported: {', '.join(_ARCHITECTURES)}"
        )
    hidden_size = header.arch_value("embedding_length")
    num_heads = header.arch_value("attention.head_count")
    tensors = header.tensors
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": _vocab_size(header),
        "hidden_size": hidden_size,
        "intermediate_size": header.arch_value("feed_forward_length"),
        "num_hidden_layers": header.arch_value("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": header.arch_value("attention.head_count_kv", num_heads),
        "head_dim": header.arch_value("attention.key_length", hidden_size // num_heads),
        "rms_norm_eps": header.arch_value("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": header.arch_value("rope.freq_base", 10000.0),
        "max_position_embeddings": header.arch_value("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors and arch != "qwen2",
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "hidden_act": "silu",
        "bos_token_id": header.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_ids(header),
    }
    rope_scaling = _rope_scaling(header, config["rope_theta"], config["head_dim"])
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _vocab_size(header: GGUFHeader) -> int:
    # The embedding's rows are what the model has (the token list can be shorter when the vocab was padded).
    embedding = header.tensors.get("token_embd.weight")
    if embedding is not None:
        return embedding.shape[0]
    return header.arch_value("vocab_size") or len(header.metadata["tokenizer.ggml.tokens"])


def _eos_token_ids(header: GGUFHeader) -> list[int] | int | None:
    # Chat models often end a turn with an end-of-turn token distinct from eos (Llama 3's <|eot_id|>).
    ids = [header.metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot")]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids or None


def _rope_scaling(header: GGUFHeader, theta: float, head_dim: int) -> dict[str, Any] | None:
    if _ROPE_FREQS in header.tensors:
        return _llama3_rope_scaling(header, theta, head_dim)
    scaling_type = header.arch_value("rope.scaling.type")
    factor = header.arch_value("rope.scaling.factor") or header.arch_value("rope.scale_linear")
    if scaling_type in (None, "none") and factor is None:
        return None
    scaling = {"rope_type": scaling_type or "linear", "factor": float(factor or 1.0)}
    original = header.arch_value("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling  # types other than linear are rejected, with a clear message, by ModelConfig


def _llama3_rope_scaling(header: GGUFHeader, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3.1+ files carry the per-frequency rotary factors as a tensor instead of the HF parameters: recover the
    parameters, assuming llama.cpp's defaults (low 1, high 4, original context 8192), and check they reproduce it."""
    factors = _read_f32_vector(header, header.tensors[_ROPE_FREQS])
    scaling = {
        "rope_type": "llama3",
        "factor": max(factors),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(factors, _llama3_factors(scaling, theta, head_dim))):
        raise ValueError(
            f"{header.path!r} has rotary scaling factors ({_ROPE_FREQS}) that are not Llama 3's with llama.cpp's "
            "defaults; this scaling is not supported"
        )
    return scaling


def _read_f32_vector(header: GGUFHeader, info: GGUFTensorInfo) -> list[float]:
    # Without numpy or torch: the config side stays light. llama.cpp writes rope_freqs in F32.
    if info.ggml_type != 0:
        raise ValueError(f"{header.path!r}: expected {info.name} in F32, found ggml type {info.ggml_type}")
    count = math.prod(info.shape)
    with open(header.path, "rb") as f:
        f.seek(info.offset)
        return list(struct.unpack(f"<{count}f", f.read(4 * count)))


def _llama3_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> list[float]:
    """The per-frequency divisors llama.cpp writes to ``rope_freqs.weight`` for HF's llama3 rotary scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


# ---- weights -------------------------------------------------------------------------------------------------------


def iterate_gguf_weights(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float tensor in HF layout) for every weight, dequantized one tensor at a time on the CPU.

    Tensors the model does not know keep their GGUF name, so that ``load_weights`` reports them.
    """
    header = read_gguf_header(path)
    num_heads = header.arch_value("attention.head_count")
    num_kv_heads = header.arch_value("attention.head_count_kv", num_heads)
    unpermute = header.architecture in _PERMUTED_QK_ARCHITECTURES
    for info in header.tensors.values():
        if info.name == _ROPE_FREQS:
            continue
        name = hf_tensor_name(info.name)
        tensor = _read_tensor(header, info)
        if unpermute and ".q_proj." in name:
            tensor = unpermute_rotary_rows(tensor, num_heads)
        elif unpermute and ".k_proj." in name:
            tensor = unpermute_rotary_rows(tensor, num_kv_heads)
        yield name, tensor


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; unknown names come back unchanged."""
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else gguf_name
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else gguf_name


def unpermute_rotary_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, its converter moves row ``j * head_dim/2 + i`` (HF's rotate_half
    halves) to row ``2i + j`` (interleaved pairs). Works on weights [rows, in] and biases [rows]."""
    rows = tensor.shape[0]
    half = rows // num_heads // 2
    return tensor.reshape(num_heads, half, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def _read_tensor(header: GGUFHeader, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor as a torch float tensor: F32/F16/BF16 as stored, quantized types dequantized to float32."""
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_size = info.shape[-1] if info.shape else 1
    num_rows = math.prod(info.shape) // row_size
    if row_size % block_size:
        raise ValueError(f"{info.name}: rows of {row_size} values do not fill {qtype.name} blocks of {block_size}")
    row_bytes = row_size // block_size * type_size
    raw = np.memmap(header.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(num_rows, row_bytes))
    if qtype == GGMLQuantizationType.BF16:  # numpy has no bfloat16; torch reads it as is
        values = torch.from_numpy(np.array(raw)).view(torch.bfloat16)
    elif qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        values = torch.from_numpy(np.array(raw).view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16))
    else:
        values = torch.from_numpy(dequantize(raw, qtype))
    return values.reshape(info.shape)


# ---- tokenizer -----------------------------------------------------------------------------------------------------


def load_gguf_tokenizer(path: str | os.PathLike[str]):
    """The HF fast tokenizer (with chat template and special tokens) that transformers converts from the file.

    ``PreTrainedTokenizerFast`` is used directly rather than ``AutoTokenizer``: the latter first builds a model
    config with transformers' slow GGUF reader, which costs seconds and is not needed.
    """
    from transformers import PreTrainedTokenizerFast

    gguf_file = _gguf_path(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    _fix_gguf_tokenizer(tokenizer, read_gguf_header(gguf_file).metadata)
    return tokenizer


def _fix_gguf_tokenizer(tokenizer, metadata: dict[str, Any]) -> None:
    """Repair what older transformers (5.17) get wrong in the conversion: special tokens taken from the wrong ids
    (eos = bos), and a sentencepiece-style decoder on byte-level vocabularies that strips a leading space."""
    special = (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))
    for attribute, key in special:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    if metadata.get("tokenizer.ggml.model") == "gpt2":
        from tokenizers import decoders

        tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
        tokenizer.clean_up_tokenization_spaces = False  # byte-level decoding is exact; "cleaning" would alter text
