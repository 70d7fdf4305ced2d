"""Random LoRA adapters for ``bench throughput --num-loras N``: PEFT-format directories (adapter_config.json +
adapter_model.safetensors) of rank ``--max-lora-rank`` on all seven projections of every layer, written without
``peft`` (no model is instantiated), and the requests spread evenly over them (request i gets adapter i mod N)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pagedllm.config import ModelConfig
from pagedllm.lora.adapter import LORA_TARGET_MODULES, module_shapes
from pagedllm.lora.request import LoRARequest

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def random_adapters(model_config: ModelConfig, num_loras: int, rank: int, seed: int = 0,
                    root: str | None = None, scale: float = 0.01) -> list[LoRARequest]:
    """``num_loras`` random adapters written under ``root`` (a new temporary directory by default); weights are
    normal with standard deviation ``scale``."""
    directory = Path(root or tempfile.mkdtemp(prefix="pagedllm-bench-loras-"))
    return [_write_adapter(model_config, directory / f"lora-{index}", rank, seed + index, index + 1, scale)
            for index in range(num_loras)]


def _write_adapter(model_config: ModelConfig, path: Path, rank: int, seed: int, lora_id: int,
                   scale: float) -> LoRARequest:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_TARGET_MODULES),
              "bias": "none", "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model_config.num_hidden_layers):
        for module, (in_size, out_size) in module_shapes(model_config).items():
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = _random((rank, in_size), generator, scale)
            tensors[f"{prefix}.lora_B.weight"] = _random((out_size, rank), generator, scale)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return LoRARequest(path.name, lora_id, str(path))


def _random(shape: tuple[int, int], generator: torch.Generator, scale: float) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)  # as adapters ship: half the bytes


def spread(adapters: list[LoRARequest], num_requests: int) -> list[LoRARequest | None] | None:
    """One adapter per request, evenly (None: no adapters)."""
    if not adapters:
        return None
    return [adapters[index % len(adapters)] for index in range(num_requests)]
