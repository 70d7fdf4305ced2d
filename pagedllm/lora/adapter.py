"""Load a PEFT LoRA adapter and check it against the base model, so that a bad adapter fails here, with a message
that names the problem, and never inside a step.

A PEFT checkpoint is ``adapter_config.json`` plus ``adapter_model.safetensors`` (or ``adapter_model.bin``) whose
tensors are named ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight``: A is [r, in],
B is [out, r], and the layer computes ``y = W x + scaling * B (A x)`` with ``scaling = lora_alpha / r`` (rsLoRA:
``lora_alpha / sqrt(r)``). The scaling is folded into B here, once.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pagedllm.config import ModelConfig

# The projections an adapter may target, by HF module name, and the fused layer (and shard) each lives in.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_LORA_RANK_LIMIT = 256

_TENSOR_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(LORA_TARGET_MODULES) + r")\.lora_(A|B)\.weight$"
)
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served over this base model (the message says why)."""


@dataclass
class LoRAAdapter:
    """A loaded adapter: per (layer index, module name) its A [r, in] and scaled B [out, r] (CPU tensors)."""

    name: str
    lora_int_id: int
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def module_shapes(model_config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(input size, output size) of each LoRA-targetable projection of the base model."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    q_size = model_config.num_attention_heads * model_config.head_dim
    kv_size = model_config.num_key_value_heads * model_config.head_dim
    return {
        "q_proj": (hidden, q_size), "k_proj": (hidden, kv_size), "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def load_adapter(path: str, name: str, lora_int_id: int, model_config: ModelConfig, max_lora_rank: int
                 ) -> LoRAAdapter:
    """Read and validate the adapter in directory ``path``; LoRAAdapterError on anything this engine cannot serve."""
    what = f"LoRA adapter {name!r} ({path})"
    config = read_adapter_config(path, what)
    rank, scaling = check_adapter_config(config, what, max_lora_rank)
    tensors = _read_tensors(path, what)
    adapter = LoRAAdapter(name, lora_int_id, rank, scaling)
    adapter.weights = _pair_tensors(tensors, what, rank, scaling, model_config)
    if not adapter.weights:
        raise LoRAAdapterError(f"{what} holds no LoRA weights for q/k/v/o/gate/up/down projections")
    return adapter


def read_adapter_config(path: str, what: str) -> dict:
    directory = Path(path)
    if not directory.is_dir():
        raise LoRAAdapterError(f"{what}: not a directory")
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise LoRAAdapterError(f"{what}: no adapter_config.json (a PEFT adapter directory is expected)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise LoRAAdapterError(f"{what}: adapter_config.json is not valid JSON ({exc})") from exc


def check_adapter_config(config: dict, what: str, max_lora_rank: int) -> tuple[int, float]:
    """The adapter's rank and scaling, after refusing what this engine does not implement."""
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise LoRAAdapterError(f"{what}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key, feature in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (fully trained modules)"),
                         ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern"),
                         ("fan_in_fan_out", "fan_in_fan_out")):
        if config.get(key):
            raise LoRAAdapterError(f"{what}: {feature} is not supported")
    if config.get("bias", "none") != "none":
        raise LoRAAdapterError(f"{what}: LoRA bias {config['bias']!r} is not supported (only 'none')")
    _check_target_modules(config.get("target_modules"), what)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LoRAAdapterError(f"{what}: r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise LoRAAdapterError(f"{what}: rank {rank} is above max_lora_rank={max_lora_rank} (raise --max-lora-rank, "
                               f"up to {MAX_LORA_RANK_LIMIT})")
    alpha = config.get("lora_alpha", 8)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _check_target_modules(targets: object, what: str) -> None:
    """Names (or a regex, or "all-linear") of the modules the adapter was trained on: all must be projections here."""
    if targets is None or isinstance(targets, str):
        return  # a regex or "all-linear": the tensor names are checked one by one instead
    unknown = [t for t in targets if t.split(".")[-1] not in LORA_TARGET_MODULES]
    if any("embed" in t or "lm_head" in t for t in unknown):
        raise LoRAAdapterError(f"{what}: adapters on embeddings or lm_head are not supported ({unknown})")
    if unknown:
        raise LoRAAdapterError(f"{what}: target modules {unknown} do not exist in this model (LoRA applies to "
                               f"{', '.join(LORA_TARGET_MODULES)})")


def _read_tensors(path: str, what: str) -> dict[str, torch.Tensor]:
    directory = Path(path)
    for filename in _WEIGHT_FILES:
        file = directory / filename
        if not file.is_file():
            continue
        try:
            if filename.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(file))
            return torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LoRAAdapterError(f"{what}: cannot read {filename} ({exc})") from exc
    raise LoRAAdapterError(f"{what}: no adapter weights ({' or '.join(_WEIGHT_FILES)})")


def _pair_tensors(tensors: dict[str, torch.Tensor], what: str, rank: int, scaling: float,
                  model_config: ModelConfig) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Group lora_A / lora_B tensors by (layer, module), check their shapes, fold the scaling into B."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in tensors.items():
        match = _TENSOR_NAME.search(tensor_name)
        if match is None:
            raise LoRAAdapterError(f"{what}: unsupported tensor {tensor_name!r} ({_unsupported_reason(tensor_name)})")
        layer, module, half = int(match[1]), match[2], match[3]
        if layer >= model_config.num_hidden_layers:
            raise LoRAAdapterError(f"{what}: {tensor_name!r} targets layer {layer}, but the base model has "
                                   f"{model_config.num_hidden_layers} layers")
        halves.setdefault((layer, module), {})[half] = tensor
    shapes = module_shapes(model_config)
    return {key: _checked_pair(key, pair, shapes[key[1]], rank, scaling, what) for key, pair in halves.items()}


def _unsupported_reason(tensor_name: str) -> str:
    if "lora_magnitude_vector" in tensor_name:
        return "DoRA is not supported"
    if "lora_embedding" in tensor_name or "embed_tokens" in tensor_name or "lm_head" in tensor_name:
        return "adapters on embeddings or lm_head are not supported"
    if ".lora_" not in tensor_name:
        return "modules_to_save (fully trained modules) are not supported"
    return f"LoRA applies to {', '.join(LORA_TARGET_MODULES)} of the decoder layers only"


def _checked_pair(key: tuple[int, str], pair: dict[str, torch.Tensor], shape: tuple[int, int], rank: int,
                  scaling: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer, module = key
    where = f"layer {layer} {module}"
    if set(pair) != {"A", "B"}:
        raise LoRAAdapterError(f"{what}: {where} has lora_{next(iter(pair))} but not its other half")
    in_size, out_size = shape
    a, b = pair["A"], pair["B"]
    if tuple(a.shape) != (rank, in_size) or tuple(b.shape) != (out_size, rank):
        raise LoRAAdapterError(
            f"{what}: {where} shapes do not match the base model: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
            f"expected ({rank}, {in_size}) and ({out_size}, {rank}) (an adapter of another model?)")
    return a.float().contiguous(), (b.float() * scaling).contiguous()
