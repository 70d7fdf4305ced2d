"""The dense linear method: one weight [output_size, input_size] in the model's dtype."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model.gemm import linear
from pagedllm.model.quantization.base import LinearMethod, add_param


class UnquantizedLinearMethod(LinearMethod):
    """``F.linear`` (or the skinny-GEMM kernel for decode-sized batches on CUDA, see ``gemm.linear``)."""

    supports_tensor_parallel = True

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], dtype: torch.dtype) -> None:
        add_param(layer, "weight", torch.empty(sum(output_sizes), input_size, dtype=dtype), output_dim=0,
                  input_dim=1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, layer.weight, bias)
