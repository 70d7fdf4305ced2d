"""compressed-tensors ``pack-quantized`` 4-bit weights (what llm-compressor writes for W4A16), run as W4A16.

The compressed-tensors config parser (``compressed_tensors.py``) builds, for each weight-only int4 scheme,
``CompressedTensorsW4A16Method(num_bits, group_size, symmetric, actorder)``:

- ``num_bits``: 4 (others are a clear error);
- ``group_size``: 32 / 64 / 128, or None / -1 for one group per output row (``strategy: channel``);
- ``symmetric``: True when the scheme has no zero points;
- ``actorder``: None, ``"weight"`` / ``"static"`` (no ``g_idx`` stored: groups contiguous) or ``"group"`` /
  ``"dynamic"`` (``weight_g_idx`` stored).

Tensors of a layer W [N, K] (G groups along K):

- ``weight_packed`` int32 [N, K / 8]: packed along K, value ``8 j + i`` of a row in bits ``4 i`` of word j, each
  value stored as ``signed + 8``;
- ``weight_scale`` [N, G]; ``weight_zero_point`` int32 [N / 8, G] (asymmetric only, packed along N, ``signed +
  8``); ``weight_g_idx`` int32 [K] (``actorder: group``); ``weight_shape`` int [2] = (N, K).

``W = (q_signed - zero_signed) * scale = (q - zero) * scale`` in the stored unsigned values (zero 8 when
symmetric). ``weight_packed`` is already the canonical int4 layout; fused shards are slices of N (output dim 0).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model.quantization.base import add_param
from pagedllm.model.quantization.gptq import shared_g_idx
from pagedllm.model.quantization.int4 import (
    PACK_FACTOR,
    Int4Checkpoint,
    Int4LinearMethod,
    check_scheme,
    contiguous_groups,
    num_groups,
    random_packed,
    small_scales,
    unpack_cols,
    unpack_rows,
)

_ACTORDER_CONTIGUOUS = (None, "weight", "static")
_ACTORDER_G_IDX = ("group", "dynamic")


class CompressedTensorsW4A16Method(Int4LinearMethod):
    """One compressed-tensors int4 weight-only scheme (see the module docstring for the arguments)."""

    format_name = "compressed-tensors W4A16"

    def __init__(self, num_bits: int, group_size: int | None, symmetric: bool, actorder: str | None = None) -> None:
        group_size = -1 if group_size is None else int(group_size)
        check_scheme(num_bits, group_size, self.format_name)
        actorder = None if actorder is None else str(getattr(actorder, "value", actorder)).lower()
        if actorder not in _ACTORDER_CONTIGUOUS + _ACTORDER_G_IDX:
            raise ValueError(f"{self.format_name}: actorder {actorder!r} is not supported")
        self.group_size, self.symmetric = group_size, symmetric
        self.has_g_idx = actorder in _ACTORDER_G_IDX

    def checkpoint_params(self) -> tuple[str, ...]:
        return ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], dtype: torch.dtype) -> None:
        n, shards = sum(output_sizes), len(output_sizes)
        groups = num_groups(input_size, self.group_size, self.format_name)
        add_param(layer, "weight_packed", torch.empty(n, input_size // PACK_FACTOR, dtype=torch.int32),
                  output_dim=0, dummy_init=random_packed)
        add_param(layer, "weight_scale", torch.empty(n, groups, dtype=torch.float32), output_dim=0,
                  dummy_init=small_scales)
        if not self.symmetric:
            if any(size % PACK_FACTOR for size in output_sizes):
                raise ValueError(f"{self.format_name}: output sizes {output_sizes} must be multiples of "
                                 f"{PACK_FACTOR} (zero points packed along N)")
            add_param(layer, "weight_zero_point", torch.empty(n // PACK_FACTOR, groups, dtype=torch.int32),
                      output_dim=0, pack_factor=PACK_FACTOR, dummy_init=random_packed)
        if self.has_g_idx:
            add_param(layer, "weight_g_idx", torch.empty(shards, input_size, dtype=torch.int32), output_dim=None,
                      per_shard=True, dummy_init=contiguous_groups(self.group_size))
        shapes = torch.tensor([[size, input_size] for size in output_sizes], dtype=torch.int64)
        add_param(layer, "weight_shape", shapes.clone(), output_dim=None, per_shard=True,
                  dummy_init=lambda tensor, _generator: tensor.copy_(shapes))
        layer.int4_expected_shapes = shapes
        layer.int4_scale_dtype = dtype  # llm-compressor stores scales in the model's dtype

    def canonical_scale_dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.int4_scale_dtype

    def unpack(self, layer: nn.Module) -> Int4Checkpoint:
        if not torch.equal(layer.weight_shape.cpu(), layer.int4_expected_shapes):
            raise ValueError(f"{self.format_name}: weight_shape {layer.weight_shape.tolist()} does not match the "
                             f"layer's {layer.int4_expected_shapes.tolist()}")
        zeros = None if self.symmetric else unpack_rows(layer.weight_zero_point)
        g_idx = shared_g_idx(layer.weight_g_idx, self.format_name) if self.has_g_idx else None
        return Int4Checkpoint(q=unpack_cols(layer.weight_packed), scales=layer.weight_scale, zeros=zeros,
                              g_idx=g_idx, group_size=self.group_size)
