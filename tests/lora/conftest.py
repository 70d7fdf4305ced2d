"""Tiny random base models (with a BPE tokenizer) and PEFT LoRA adapters made on them with the ``peft`` library.

Adapters get random non-zero ``lora_B`` (PEFT starts B at zero, which would make every adapter the base model), and
vary in rank, alpha, rsLoRA and target modules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.entrypoints.conftest import save_bpe_tokenizer
from tests.utils import build_tiny_model

# name -> LoraConfig arguments
ADAPTER_SPECS: dict[str, dict] = {
    "all_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]),
    "attn_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp_r16_rslora": dict(r=16, lora_alpha=32, use_rslora=True, target_modules=["gate_proj", "up_proj",
                                                                                  "down_proj"]),
    "ko_r2": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"]),
}


def make_peft_adapter(base_dir: str, out_dir: Path, seed: int, **lora_args) -> str:
    """Wrap the base model with PEFT, draw every lora_A / lora_B at a scale that changes the outputs, save it."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_args))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                scale = 1.0 if "lora_A" in name else 0.4  # B: a delta near half the base output, not dominating it
                param.copy_(scale * torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)


def peft_merged_model(base_dir: str, adapter_dir: str) -> torch.nn.Module:
    """HF transformers + PEFT reference: the adapter merged into the base weights, float32, eager attention."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    return peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="session")
def lora_base(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``lora_base(arch)`` -> a tiny random model directory with a BPE tokenizer."""
    root = tmp_path_factory.mktemp("lora_models")
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_model(root, arch, vocab_size=320)
            save_bpe_tokenizer(built[arch], 300)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory, lora_base) -> Callable[[str, str], str]:
    """``lora_adapter(arch, name)`` -> a PEFT adapter directory (ADAPTER_SPECS[name]) over ``lora_base(arch)``."""
    root = tmp_path_factory.mktemp("lora_adapters")
    built: dict[tuple[str, str], str] = {}

    def get(arch: str, name: str, seed: int | None = None) -> str:
        key = (arch, name if seed is None else f"{name}-{seed}")
        if key not in built:
            seed_value = sorted(ADAPTER_SPECS).index(name) + 1 if seed is None else seed
            built[key] = make_peft_adapter(lora_base(arch), root / f"{arch}-{key[1]}", seed_value,
                                           **ADAPTER_SPECS[name])
        return built[key]

    return get
