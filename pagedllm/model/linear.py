"""Linear layers whose parameters know how to load themselves from a checkpoint.

Each parameter carries ``weight_loader(param, loaded_tensor, shard_id=None)`` (the vLLM pattern): the model loader
maps a checkpoint name onto a parameter (and a shard id for fused projections) and lets the parameter place the
tensor. A layer's weight parameters and its product belong to its quantization method
(``quantization/base.py``: dense, FP8, int4, ...); the layer owns the bias and the shard bookkeeping of fused
projections. Tensor-parallel sharding hooks in here later the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedllm.model.quantization.base import QuantizationConfig, add_param
from pagedllm.model.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from pagedllm.lora.layers import LoRALayerWeights

WeightLoader = Callable[..., None]


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    """Attach ``loader`` to ``param`` as its ``weight_loader`` attribute."""
    param.weight_loader = loader  # type: ignore[attr-defined]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy a whole tensor into ``param`` (casting dtype and moving device as needed)."""
    if shard_id is not None:
        raise ValueError(f"This parameter is not fused; got shard id {shard_id!r}")
    _copy_checked(param.data, loaded, "")


def _copy_checked(target: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if target.shape != loaded.shape:
        raise ValueError(f"Shape mismatch{what}: parameter {tuple(target.shape)}, checkpoint tensor "
                         f"{tuple(loaded.shape)}")
    target.copy_(loaded)


class _Shard:
    """Where one shard of a fused projection sits: its index among the shards and its output rows."""

    def __init__(self, index: int, offset: int, size: int) -> None:
        self.index, self.offset, self.size = index, offset, size


def load_into(param: nn.Parameter, loaded: torch.Tensor, shard: _Shard | None) -> None:
    """Place a checkpoint tensor in ``param`` following its layout (``add_param``): whole, one shard's slice of
    the output dimension (offsets divided by the packing factor), or one shard's slot of a per-shard value."""
    if getattr(param, "per_shard", False):
        slot = param.data[0 if shard is None else shard.index]
        _copy_checked(slot, loaded.reshape(slot.shape) if loaded.numel() == slot.numel() else loaded, " (per shard)")
        return
    output_dim = getattr(param, "output_dim", None)
    if shard is None or output_dim is None:  # a plain layer, or a tensor all shards share (GPTQ's g_idx)
        _copy_checked(param.data, loaded, "")
        return
    pack = getattr(param, "pack_factor", 1)
    target = param.data.narrow(output_dim, shard.offset // pack, shard.size // pack)
    _copy_checked(target, loaded, f" for shard {shard.index}")


class Linear(nn.Module):
    """``y = x W^T + b`` with W [output_size, input_size], stored and multiplied by its quantization method.

    ``prefix`` is the layer's module name in the checkpoint (``model.layers.0.mlp.down_proj``): the quantization
    config decides per layer (checkpoints leave some layers dense)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        self._build(input_size, [output_size], bias, quant_config, [prefix])

    def _build(self, input_size: int, output_sizes: list[int], bias: bool,
               quant_config: QuantizationConfig | None, checkpoint_prefixes: list[str]) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = sum(output_sizes)
        self.quant_method = (UnquantizedLinearMethod() if quant_config is None
                             else quant_config.linear_method(checkpoint_prefixes))
        self.quant_method.create_weights(self, input_size, output_sizes, torch.get_default_dtype())
        self.bias = (add_param(self, "bias", torch.empty(self.output_size), output_dim=0) if bias else None)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is not None:
            raise ValueError(f"This parameter is not fused; got shard id {shard_id!r}")
        load_into(param, loaded, None)

    @property
    def is_dense(self) -> bool:
        """Whether the layer holds a plain ``weight`` [output_size, input_size] in the model's dtype."""
        return isinstance(self.quant_method, UnquantizedLinearMethod)

    # The layer's LoRA adapter slots (``lora/slots.py`` sets them when LoRA is enabled): their delta is added to
    # the product of any quantization method.
    lora: LoRALayerWeights | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        if self.lora is not None:
            self.lora.add_delta(x, y)
        return y

    def extra_repr(self) -> str:
        method = type(self.quant_method).__name__
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, method={method}"


class _FusedLinear(Linear):
    """Several projections of the same input stacked along the output dimension, one GEMM for all of them.

    Subclasses name the shards; each shard id maps to a row range of the weight (and bias).
    """

    def __init__(self, input_size: int, shard_sizes: dict[object, int], bias: bool,
                 quant_config: QuantizationConfig | None, checkpoint_prefixes: list[str]) -> None:
        self.shards: dict[object, _Shard] = {}
        offset = 0
        for index, (shard_id, size) in enumerate(shard_sizes.items()):
            self.shards[shard_id] = _Shard(index, offset, size)
            offset += size
        self._build(input_size, list(shard_sizes.values()), bias, quant_config, checkpoint_prefixes)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None and not getattr(param, "per_shard", False):
            # A checkpoint that stores the projection fused already (Phi-3's qkv_proj, gate_up_proj): whole.
            load_into(param, loaded, None)
            return
        if shard_id not in self.shards:
            raise ValueError(f"Unknown shard id {shard_id!r}; expected one of {list(self.shards)}")
        load_into(param, loaded, self.shards[shard_id])


def _part_prefixes(prefix: str, parts: list[str]) -> list[str]:
    """The checkpoint module names of a fused layer's parts: ``model.layers.0.self_attn`` + ``q_proj`` ..."""
    return [f"{prefix}.{part}" if prefix else part for part in parts]


class QKVLinear(_FusedLinear):
    """Fused q/k/v projection: output rows are [q (num_heads * head_dim), k, v (num_kv_heads * head_dim each)].

    Shard ids are ``"q"``, ``"k"`` and ``"v"``; ``prefix`` is the attention module's name in the checkpoint.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, bias, quant_config,
                         _part_prefixes(prefix, ["q_proj", "k_proj", "v_proj"]))


class MergedLinear(_FusedLinear):
    """Fused projections of one input (gate/up of the MLP); shard id ``i`` is the ``i``-th of ``output_sizes``,
    stored in the checkpoint under ``part_names[i]`` of the module ``prefix``."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 part_names: list[str] | None = None) -> None:
        self.output_sizes = list(output_sizes)
        names = part_names or [str(i) for i in range(len(output_sizes))]
        super().__init__(input_size, dict(enumerate(output_sizes)), bias, quant_config,
                         _part_prefixes(prefix, names))
