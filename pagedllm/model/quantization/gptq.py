"""GPTQ checkpoints (``quant_method: gptq``, as AutoGPTQ / GPTQModel write them), 4-bit, run as W4A16.

Tensors of a layer W [N, K] in groups of g along K (G = K / g):

- ``qweight`` int32 [K / 8, N]: packed along K, row ``8 j + i`` of W^T in bits ``4 i`` of word j;
- ``qzeros`` int32 [G, N / 8]: packed along N the same way;
- ``scales`` float16 [G, N];
- ``g_idx`` int32 [K]: each input column's group, not monotone with ``desc_act`` (act-order).

``W[n, k] = (q - zero) * scale`` with the group ``g_idx[k]``. The zeros of ``checkpoint_format: gptq`` (v1, the
default) are stored minus one, which every v1 kernel adds back (a zero of 0 is stored as 15 and read as 16, as
exllama reads it); ``gptq_v2`` stores them as they are. Fused q/k/v (gate/up) shards are slices of N, so every
tensor but ``g_idx`` has output dim 1; the shards' ``g_idx`` are kept apart and must agree (they do: the shards
share one input, hence one act-order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.model.quantization.base import DummyInit, QuantizationConfig, add_param
from pagedllm.model.quantization.int4 import (
    PACK_FACTOR,
    SYMMETRIC_ZERO,
    Int4Checkpoint,
    Int4LinearMethod,
    check_scheme,
    constant_nibbles,
    contiguous_groups,
    num_groups,
    random_packed,
    small_scales,
    unpack_cols,
    unpack_rows,
)

_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class GPTQConfig(QuantizationConfig):
    """A GPTQ checkpoint's scheme: bits, group size, act-order, symmetry and the zeros' convention."""

    name = "gptq"

    def __init__(self, bits: int = 4, group_size: int = 128, desc_act: bool = False, sym: bool = True,
                 checkpoint_format: str = "gptq") -> None:
        check_scheme(bits, group_size, "GPTQ")
        if checkpoint_format not in _CHECKPOINT_FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; expected one of "
                             f"{_CHECKPOINT_FORMATS}")
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym
        self.checkpoint_format = checkpoint_format

    @classmethod
    def from_config(cls, hf_config: dict[str, Any] | None) -> GPTQConfig:
        """From ``config.json``'s ``quantization_config``; None (dummy weights): 4 bits, group 128, no act-order."""
        if hf_config is None:
            return cls()
        return cls(bits=int(hf_config.get("bits", 4)), group_size=int(hf_config.get("group_size", 128)),
                   desc_act=bool(hf_config.get("desc_act", False)), sym=bool(hf_config.get("sym", True)),
                   checkpoint_format=str(hf_config.get("checkpoint_format", "gptq")))

    def linear_method(self, checkpoint_prefixes: list[str]) -> GPTQLinearMethod:
        return GPTQLinearMethod(self)


class GPTQLinearMethod(Int4LinearMethod):
    """Registers GPTQ's four tensors; unpacks them into the shared int4 layout after loading."""

    format_name = "GPTQ"

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config

    def checkpoint_params(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales", "g_idx")

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], dtype: torch.dtype) -> None:
        n = sum(output_sizes)
        groups = num_groups(input_size, self.config.group_size, "GPTQ")
        _check_output_sizes(output_sizes)
        add_param(layer, "qweight", torch.empty(input_size // PACK_FACTOR, n, dtype=torch.int32), output_dim=1,
                  dummy_init=random_packed)
        add_param(layer, "qzeros", torch.empty(groups, n // PACK_FACTOR, dtype=torch.int32), output_dim=1,
                  pack_factor=PACK_FACTOR, dummy_init=self._dummy_zeros())
        # float32 while loading: any checkpoint dtype lands exactly; the canonical copy is float16.
        add_param(layer, "scales", torch.empty(groups, n, dtype=torch.float32), output_dim=1,
                  dummy_init=small_scales)
        add_param(layer, "g_idx", torch.empty(len(output_sizes), input_size, dtype=torch.int32), output_dim=None,
                  per_shard=True, dummy_init=contiguous_groups(self.config.group_size))

    def _dummy_zeros(self) -> DummyInit:
        """Dummy weights' zeros as real checkpoints hold them: random when asymmetric; when symmetric all the
        midpoint 8 (stored as 7 by ``checkpoint_format: gptq``), which the loader then drops (``int4.to_canonical``)."""
        if not self.config.sym:
            return random_packed
        return constant_nibbles(SYMMETRIC_ZERO - 1 if self.config.checkpoint_format == "gptq" else SYMMETRIC_ZERO)

    def unpack(self, layer: nn.Module) -> Int4Checkpoint:
        zeros = unpack_cols(layer.qzeros).t()
        if self.config.checkpoint_format == "gptq":
            zeros = zeros + 1  # v1 stores zero - 1
        return Int4Checkpoint(q=unpack_rows(layer.qweight).t(), scales=layer.scales.t(), zeros=zeros,
                              g_idx=shared_g_idx(layer.g_idx, "GPTQ"), group_size=self.config.group_size)


def _check_output_sizes(output_sizes: list[int]) -> None:
    for size in output_sizes:
        if size % PACK_FACTOR:
            raise ValueError(f"GPTQ: output size {size} is not a multiple of {PACK_FACTOR} (packed zeros)")


def shared_g_idx(per_shard: torch.Tensor, where: str) -> torch.Tensor:
    """The one ``g_idx`` of a (fused) layer: its shards' copies must be equal, since one permutation of the input
    serves them all."""
    first = per_shard[0]
    if not first.is_meta and not bool((per_shard == first).all()):  # (meta: a model sized, not loaded)
        raise ValueError(f"{where}: the fused shards of a layer have different g_idx (act-order); pagedllm needs "
                         "one input order per layer")
    return first
