"""FP8 weights (float8_e4m3fn), W8A8 on GPUs with FP8 tensor cores, a dequantizing fallback elsewhere.

Two sources of FP8 layers:

- a checkpoint written in FP8: HF / AutoFP8 ``quantization_config = {"quant_method": "fp8", "activation_scheme":
  "static" | "dynamic"}`` (``Fp8Config``), or compressed-tensors' float-quantized schemes
  (``compressed_tensors.py`` builds an ``Fp8LinearMethod`` from each scheme). Tensors per layer: ``weight`` (FP8),
  ``weight_scale`` (per tensor: [] or [1]; per channel: [N, 1]), and ``input_scale`` for static activations;
- ``--quantization fp8`` on a 16/32-bit checkpoint: each weight is quantized at load, one scale per output channel,
  and activations get a dynamic scale per token.

Whatever the checkpoint held, after loading every layer has ``weight`` fp8 [N, K], ``weight_scale`` float32 [N]
(a per-tensor scale of each fused shard, q/k/v or gate/up, differs per shard: it is expanded to its shard's rows,
so nothing is requantized) and ``input_scale`` (float32 [1], the max over the shards' static scales, since they all
quantize the same input; None when dynamic). The product is ``fp8_gemm.fp8_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pagedllm.model.quantization.base import (
    FusedInputLinear,
    LinearMethod,
    QuantizationConfig,
    add_param,
    replace_param,
)
from pagedllm.model.quantization.fp8_gemm import (
    FP8_DTYPE,
    ActivationScheme,
    fp8_linear,
    fused_input_kernels,
    gemv_fuses_input,
    quantize_weight,
)
from pagedllm.model.quantization.unquantized import UnquantizedLinearMethod

WeightStrategy = Literal["tensor", "channel"]
_DUMMY_WEIGHT_SCALE = 0.02 / 1.5  # N(0, 1) FP8 values times this: about the dense dummy's N(0, 0.02^2)
_DUMMY_INPUT_SCALE = 8.0 / 448.0  # static activations up to ~8 (unit-scale hidden states) fit


@dataclass(frozen=True)
class Fp8Scheme:
    """How one layer's FP8 weight is stored and how its activations are scaled.

    ``is_serialized``: the checkpoint holds FP8 tensors (else a dense weight is quantized at load)."""

    is_serialized: bool
    weight_strategy: WeightStrategy = "channel"
    activations: ActivationScheme = "dynamic_token"

    def __post_init__(self) -> None:
        if self.weight_strategy not in ("tensor", "channel"):
            raise ValueError(f"FP8 weight strategy {self.weight_strategy!r} is not supported (tensor or channel)")
        if self.activations == "static" and not self.is_serialized:
            raise ValueError("Static FP8 activation scales come from a checkpoint; online FP8 is dynamic")


class Fp8LinearMethod(LinearMethod):
    """FP8 weight with float32 scales; see the module docstring for the parameters before and after loading."""

    supports_tensor_parallel = True  # per-tensor and per-channel scales both slice with their weight

    def __init__(self, scheme: Fp8Scheme) -> None:
        self.scheme = scheme

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], dtype: torch.dtype) -> None:
        layer.fp8_shard_sizes = list(output_sizes)
        num_rows = sum(output_sizes)
        if not self.scheme.is_serialized:  # online: the dense checkpoint weight, quantized after loading
            add_param(layer, "weight", torch.empty(num_rows, input_size, dtype=dtype), output_dim=0, input_dim=1)
            return
        add_param(layer, "weight", torch.empty(num_rows, input_size, dtype=FP8_DTYPE), output_dim=0,
                  input_dim=1, dummy_init=_dummy_fp8_weight)
        if self.scheme.weight_strategy == "tensor":
            add_param(layer, "weight_scale", torch.empty(len(output_sizes), dtype=torch.float32), output_dim=None,
                      per_shard=True, dummy_init=_fill(_DUMMY_WEIGHT_SCALE))
        else:  # [N, 1] as compressed-tensors writes it: a fused shard is a slice of the rows
            add_param(layer, "weight_scale", torch.empty(num_rows, 1, dtype=torch.float32), output_dim=0,
                      dummy_init=_fill(_DUMMY_WEIGHT_SCALE))
        if self.scheme.activations == "static":
            add_param(layer, "input_scale", torch.empty(len(output_sizes), dtype=torch.float32), output_dim=None,
                      per_shard=True, dummy_init=_fill(_DUMMY_INPUT_SCALE))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.scheme.is_serialized:
            weight, scale = quantize_weight(layer.weight.data)
            replace_param(layer, "weight", weight)
        else:
            scale = _per_channel_scale(layer.weight_scale.data, layer.fp8_shard_sizes, self.scheme.weight_strategy)
            replace_param(layer, "weight", layer.weight.data.contiguous())
        _set_param(layer, "weight_scale", scale.float().contiguous())
        if self.scheme.activations == "static":
            replace_param(layer, "input_scale", layer.input_scale.data.float().amax().reshape(1))
        else:
            layer.input_scale = None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, bias, self.scheme.activations, layer.input_scale)

    def fused_input(self, layer: nn.Module, x: torch.Tensor) -> FusedInputLinear | None:
        """The GEMV with the op before it in its prologue, for a one-row x on the GEMV path (``fp8_gemm``)."""
        return Fp8FusedInputGemv(layer) if gemv_fuses_input(x, layer.weight, self.scheme.activations) else None


@dataclass(frozen=True)
class Fp8FusedInputGemv:
    """``FusedInputLinear`` of one FP8 layer on the one-row GEMV (weight only, as ``fp8_linear`` runs it there)."""

    layer: nn.Module

    def rms_norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layer
        x2d = x.reshape(1, -1).contiguous()
        residual2d = residual.reshape(1, -1).contiguous() if residual is not None else None
        out, new_residual = fused_input_kernels().fp8_rms_norm_gemv(x2d, residual2d, norm_weight, eps, layer.weight,
                                                                    layer.weight_scale, layer.bias)
        return out.view(*x.shape[:-1], -1), new_residual.view(x.shape)

    def silu_mul_linear(self, gate_up: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        out = fused_input_kernels().fp8_silu_mul_gemv(gate_up.reshape(1, -1).contiguous(), layer.weight,
                                                      layer.weight_scale, layer.bias)
        return out.view(*gate_up.shape[:-1], -1)


def _set_param(layer: nn.Module, name: str, data: torch.Tensor) -> None:
    """Replace parameter ``name``, or register it when the layer had none (online FP8 adds its scale)."""
    if hasattr(layer, name):
        replace_param(layer, name, data)
    else:
        layer.register_parameter(name, nn.Parameter(data, requires_grad=False))


def _per_channel_scale(loaded: torch.Tensor, shard_sizes: list[int], strategy: WeightStrategy) -> torch.Tensor:
    """One scale per output row: a per-tensor scale of each shard repeated over that shard's rows."""
    if strategy == "channel":
        return loaded.reshape(-1)
    # expand + cat rather than repeat_interleave: sizes known on the host, so this also runs on the meta device.
    per_shard = loaded.reshape(-1)
    return torch.cat([per_shard[i].expand(size) for i, size in enumerate(shard_sizes)])


def _dummy_fp8_weight(weight: torch.Tensor, generator: torch.Generator) -> None:
    values = torch.randn(weight.shape, generator=generator, device=weight.device)
    weight.copy_(values.clamp(-448.0, 448.0).to(FP8_DTYPE))


def _fill(value: float):
    def fill(tensor: torch.Tensor, generator: torch.Generator) -> None:
        tensor.fill_(value)

    return fill


class Fp8Config(QuantizationConfig):
    """``quant_method: "fp8"`` checkpoints (HF / AutoFP8: per-tensor weight scales, static or dynamic activations),
    or, without a checkpoint config, online FP8 (``--quantization fp8`` on a dense checkpoint)."""

    name = "fp8"

    def __init__(self, scheme: Fp8Scheme, ignored_layers: tuple[str, ...] = ()) -> None:
        self.scheme = scheme
        self.ignored_layers = ignored_layers

    @classmethod
    def from_config(cls, hf_config: dict[str, Any] | None) -> Fp8Config:
        if hf_config is None:
            return cls(Fp8Scheme(is_serialized=False))
        if hf_config.get("weight_block_size") is not None:
            raise ValueError(f"Block-wise FP8 checkpoints (weight_block_size={hf_config['weight_block_size']}) are "
                             "not supported; pagedllm loads per-tensor and per-channel FP8 weight scales")
        activation = hf_config.get("activation_scheme", "dynamic")
        if activation not in ("static", "dynamic"):
            raise ValueError(f"FP8 activation_scheme {activation!r} is not supported (static or dynamic)")
        if hf_config.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"FP8 format {hf_config['fmt']!r} is not supported; only e4m3 weights")
        ignored = tuple(hf_config.get("ignored_layers") or hf_config.get("modules_to_not_convert") or ())
        scheme = Fp8Scheme(True, "tensor", "static" if activation == "static" else "dynamic_token")
        return cls(scheme, ignored)

    def linear_method(self, checkpoint_prefixes: list[str]) -> LinearMethod:
        ignored = [prefix for prefix in checkpoint_prefixes if self._is_ignored(prefix)]
        if not ignored:
            return Fp8LinearMethod(self.scheme)
        if len(ignored) == len(checkpoint_prefixes):
            return UnquantizedLinearMethod()
        raise ValueError(f"The checkpoint leaves {ignored} unquantized but not the other parts of the same fused "
                         f"layer ({[p for p in checkpoint_prefixes if p not in ignored]}); pagedllm needs all "
                         "parts of a fused projection quantized alike")

    def _is_ignored(self, prefix: str) -> bool:
        # AutoFP8 lists module names; transformers' modules_to_not_convert may list a name's last part.
        return any(prefix == name or prefix.endswith(f".{name}") for name in self.ignored_layers)
