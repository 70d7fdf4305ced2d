"""The quantization hook of the linear layers: a ``LinearMethod`` owns a layer's weight parameters, how checkpoint
tensors land in them, and the matrix product.

Every linear layer asks its ``QuantizationConfig`` for a method at construction (``linear_method``); the method
registers its parameters on the layer with ``add_param``, which records how each one is laid out so that one
generic loader (``linear.load_into``) can place a checkpoint tensor, or one shard of a fused projection, in it:

- ``output_dim``: the dimension that runs over output features (shards of fused qkv / gate_up are slices of it),
  None for a tensor every shard shares (GPTQ's ``g_idx``);
- ``pack_factor``: values packed into one element along ``output_dim`` (8 for int4 in int32), so shard offsets
  and sizes divide by it;
- ``input_dim``: the dimension that runs over input features, for a row-parallel layer's tensor-parallel slice
  (None: every rank holds the whole tensor, e.g. a per-channel scale);
- ``per_shard``: one value per shard (a per-tensor scale of each of q, k and v), the parameter holding one slot
  per shard.

After the checkpoint is loaded, ``process_weights_after_loading`` may repack the parameters into whatever layout the
method's kernel wants (or quantize a dense weight, for online FP8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

DummyInit = Callable[[torch.Tensor, torch.Generator], None]


class LinearMethod:
    """How a linear layer stores its weight and computes ``x W^T + b``; one instance may serve many layers."""

    # Whether the parameters declare the layout a tensor-parallel slice needs (``input_dim`` on the weight).
    supports_tensor_parallel = False

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], dtype: torch.dtype) -> None:
        """Register the weight parameters of ``layer`` (``output_sizes``: one entry per fused shard)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack or quantize the loaded parameters for ``apply``; nothing by default."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T + bias`` for ``x`` [..., input_size], in ``x``'s dtype."""
        raise NotImplementedError

    def fused_input(self, layer: nn.Module, x: torch.Tensor) -> FusedInputLinear | None:
        """The layer's product with the op before it (RMSNorm, SiLU-and-mul) inside its kernel, for an input like
        ``x`` [..., input_size] on this device; None (the default): the ops run one by one."""
        return None


class FusedInputLinear(Protocol):
    """A linear layer whose kernel computes its own input as it loads it: one launch instead of two."""

    def rms_norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer(rms_norm(x + residual) * norm_weight)`` and ``x + residual`` (``x`` without a residual)."""

    def silu_mul_linear(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``layer(silu(gate) * up)`` for ``gate_up`` [..., 2 * input_size]."""


class QuantizationConfig:
    """A quantization scheme as read from a checkpoint's ``quantization_config`` (or asked for online)."""

    name: str = ""

    def linear_method(self, checkpoint_prefixes: list[str]) -> LinearMethod:
        """The method for the linear layer holding these checkpoint modules (several for a fused projection, e.g.
        ``model.layers.0.self_attn.q_proj``, ``...k_proj``, ``...v_proj``)."""
        raise NotImplementedError


def add_param(
    layer: nn.Module,
    name: str,
    data: torch.Tensor,
    *,
    output_dim: int | None,
    pack_factor: int = 1,
    per_shard: bool = False,
    dummy_init: DummyInit | None = None,
    input_dim: int | None = None,
) -> nn.Parameter:
    """Register ``data`` as the frozen parameter ``name`` of ``layer``, with the layout the loader needs (see the
    module docstring) and, optionally, how ``load_format="dummy"`` fills it (default: N(0, 0.02^2) for floats)."""
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.pack_factor = pack_factor  # type: ignore[attr-defined]
    param.per_shard = per_shard  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]
    if dummy_init is not None:
        param.dummy_init = dummy_init  # type: ignore[attr-defined]
    layer.register_parameter(name, param)
    return param


def replace_param(layer: nn.Module, name: str, data: torch.Tensor) -> None:
    """Swap parameter ``name`` for ``data`` after loading (a repacked or quantized tensor), freeing the old one."""
    delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(data, requires_grad=False))
