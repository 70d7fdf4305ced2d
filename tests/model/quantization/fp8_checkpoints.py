"""FP8 checkpoints of tiny random HF models for the FP8 tests: compressed-tensors ones written by the
compressed-tensors library itself (its quantization lifecycle and ``ModelCompressor``), an AutoFP8-style one
(``quant_method: "fp8"``) quantized with torch, and the dequantized dense twin of any of them (what HF transformers
runs as the reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _calibration_amax(model: torch.nn.Module, vocab_size: int) -> dict[str, float]:
    """The largest |input| each Linear sees over a few random prompts (static activation scales)."""
    amax: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.randint(3, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)))
    for handle in hooks:
        handle.remove()
    return amax


def write_compressed_tensors_fp8(dense_dir: str, out_dir: Path, weight_strategy: str = "channel",
                                 activations: str = "dynamic_token", ignore: list[str] | None = None,
                                 fmt: str = "float-quantized") -> str:
    """Quantize ``dense_dir`` to FP8 with compressed-tensors and save it as llm-compressor would.

    ``activations``: "dynamic_token", "dynamic_tensor", "static" or "none"; scales come from the library's
    ``calculate_qparams`` (weights: min/max per tensor or row; static inputs: max over a calibration pass)."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    amax = _calibration_amax(model, model.config.vocab_size)
    weight_args = QuantizationArgs(num_bits=8, type="float", strategy=weight_strategy, symmetric=True)
    input_args = _input_args(activations, QuantizationArgs)
    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args, input_activations=input_args)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head", *(ignore or [])])
    apply_quantization_config(model, config, show_progress=False)
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        w = module.weight.data
        dims = dict(dim=1, keepdim=True) if weight_strategy == "channel" else {}
        low, high = (w.amin(**dims), w.amax(**dims)) if dims else (w.amin().reshape(1), w.amax().reshape(1))
        module.weight_scale.data.copy_(calculate_qparams(low, high, weight_args)[0].reshape(module.weight_scale.shape))
        if activations == "static":
            value = torch.tensor([-amax[name], amax[name]])
            scale = calculate_qparams(value[:1], value[1:], input_args)[0]
            module.input_scale.data.copy_(scale.reshape(module.input_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    return str(out_dir)


def _input_args(activations: str, args_class: Any) -> Any:
    if activations == "none":
        return None
    if activations == "static":
        return args_class(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    strategy = "token" if activations == "dynamic_token" else "tensor"
    return args_class(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=True)


def write_autofp8(dense_dir: str, out_dir: Path, activation_scheme: str = "static") -> str:
    """An AutoFP8-style checkpoint (``quant_method: "fp8"``): per-tensor weight scales (scalars, as AutoFP8 writes
    them), and with ``static`` a per-tensor ``input_scale`` per projection (made-up but distinct per shard)."""
    shutil.copytree(dense_dir, out_dir)
    tensors = load_file(str(out_dir / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in _PROJECTIONS):
            out[name] = tensor
            continue
        scale = tensor.abs().max().float() / FP8_MAX
        out[name] = (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out[f"{module}.weight_scale"] = scale.reshape(())
        if activation_scheme == "static":
            out[f"{module}.input_scale"] = torch.tensor(0.01 + 0.001 * (len(out) % 7))
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": activation_scheme,
                                     "ignored_layers": ["lm_head"]}
    (out_dir / "config.json").write_text(json.dumps(config))
    return str(out_dir)


def dequantized_state_dict(fp8_dir: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every FP8 weight turned back into float32 ``weight * weight_scale``."""
    tensors = load_file(str(Path(fp8_dir) / "model.safetensors"))
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        if tensor.dtype == FP8:
            scale = tensors[name.removesuffix("weight") + "weight_scale"].float()
            scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
            tensor = tensor.float() * scale
        dense[name] = tensor
    return dense


def write_dequantized(fp8_dir: str, out_dir: Path) -> str:
    """The dense float32 twin of an FP8 checkpoint (no quantization_config): HF's reference model."""
    out_dir.mkdir(parents=True)
    for path in Path(fp8_dir).iterdir():
        if path.suffix == ".json" and path.name != "model.safetensors.index.json":
            shutil.copy(path, out_dir / path.name)
    save_file(dequantized_state_dict(fp8_dir), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config))
    return str(out_dir)
