"""AWQ checkpoints (``quant_method: awq``, AutoAWQ's GEMM layout, ``version: gemm``), 4-bit, run as W4A16.

Tensors of a layer W [N, K] in groups of g along K (G = K / g):

- ``qweight`` int32 [K, N / 8]: packed along N, with AWQ's interleaved order: word j's nibble p (bits ``4 p``)
  holds column ``8 j + [0, 2, 4, 6, 1, 3, 5, 7][p]``;
- ``qzeros`` int32 [G, N / 8]: packed the same way;
- ``scales`` float16 [G, N].

``W[n, k] = (q - zero) * scale``, groups contiguous along K (no act-order). Fused shards are slices of N, so every
tensor has output dim 1, the packed ones with pack factor 8. Only the GEMM layout with zero points is supported:
GEMV / Marlin / exllama variants are a clear error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.model.quantization.base import LinearMethod, QuantizationConfig, add_param
from pagedllm.model.quantization.int4 import (
    PACK_FACTOR,
    Int4Checkpoint,
    Int4LinearMethod,
    check_scheme,
    num_groups,
    random_packed,
    small_scales,
    unpack_cols,
)
from pagedllm.model.quantization.unquantized import UnquantizedLinearMethod

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column of each nibble within a word
# Unpacked position of column c within its word: the inverse of AWQ_PACK_ORDER.
_UNPACK_ORDER = tuple(AWQ_PACK_ORDER.index(c) for c in range(PACK_FACTOR))


class AWQConfig(QuantizationConfig):
    """An AWQ checkpoint's scheme: bits, group size, and the modules it leaves dense."""

    name = "awq"

    def __init__(self, bits: int = 4, group_size: int = 128, zero_point: bool = True, version: str = "gemm",
                 modules_to_not_convert: list[str] | None = None) -> None:
        check_scheme(bits, group_size, "AWQ")
        if version.lower() != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; pagedllm loads the GEMM layout only")
        if not zero_point:
            raise ValueError("AWQ without zero points (zero_point: false) is not supported")
        self.bits, self.group_size = bits, group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, hf_config: dict[str, Any] | None) -> AWQConfig:
        """From ``config.json``'s ``quantization_config`` (AutoAWQ's or transformers' key names); None (dummy
        weights): 4 bits, group 128."""
        if hf_config is None:
            return cls()
        return cls(bits=int(hf_config.get("bits", hf_config.get("w_bit", 4))),
                   group_size=int(hf_config.get("group_size", hf_config.get("q_group_size", 128))),
                   zero_point=bool(hf_config.get("zero_point", True)), version=str(hf_config.get("version", "gemm")),
                   modules_to_not_convert=hf_config.get("modules_to_not_convert"))

    def linear_method(self, checkpoint_prefixes: list[str]) -> LinearMethod:
        if any(skip in prefix for prefix in checkpoint_prefixes for skip in self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self)


class AWQLinearMethod(Int4LinearMethod):
    """Registers AWQ's three tensors; undoes the interleaved packing into the shared int4 layout after loading."""

    format_name = "AWQ"

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def checkpoint_params(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], dtype: torch.dtype) -> None:
        n = sum(output_sizes)
        groups = num_groups(input_size, self.config.group_size, "AWQ")
        if any(size % PACK_FACTOR for size in output_sizes):
            raise ValueError(f"AWQ: output sizes {output_sizes} must be multiples of {PACK_FACTOR} (packed along N)")
        add_param(layer, "qweight", torch.empty(input_size, n // PACK_FACTOR, dtype=torch.int32), output_dim=1,
                  pack_factor=PACK_FACTOR, dummy_init=random_packed)
        add_param(layer, "qzeros", torch.empty(groups, n // PACK_FACTOR, dtype=torch.int32), output_dim=1,
                  pack_factor=PACK_FACTOR, dummy_init=random_packed)
        add_param(layer, "scales", torch.empty(groups, n, dtype=torch.float32), output_dim=1, dummy_init=small_scales)

    def unpack(self, layer: nn.Module) -> Int4Checkpoint:
        return Int4Checkpoint(q=unpack_awq_cols(layer.qweight).t(), scales=layer.scales.t(),
                              zeros=unpack_awq_cols(layer.qzeros).t(), g_idx=None,
                              group_size=self.config.group_size)


def unpack_awq_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] in AWQ's interleaved order -> int32 [R, C] in column order."""
    values = unpack_cols(packed)
    order = torch.tensor(_UNPACK_ORDER, device=packed.device)
    index = (torch.arange(0, values.shape[1], PACK_FACTOR, device=packed.device)[:, None] + order).reshape(-1)
    return values[:, index]
