"""Linear layers whose parameters know how to load themselves from a checkpoint.

Each parameter carries ``weight_loader(param, loaded_tensor, shard_id=None)`` (the vLLM pattern): the model loader
maps a checkpoint name onto a parameter (and a shard id for fused projections) and lets the parameter place the
tensor. A layer's weight parameters and its product belong to its quantization method
(``quantization/base.py``: dense, FP8, int4, ...); the layer owns the bias and the shard bookkeeping of fused
projections.

Tensor parallelism (Megatron style) is a layout of the same layers: a ``"column"`` layer holds this rank's slice of
the output features (fused q/k/v by heads, gate/up by columns) and needs no communication; a ``"row"`` layer holds
this rank's slice of the input features and sums the partial products with one all-reduce. The loader narrows each
checkpoint tensor to the rank's slice (``output_dim`` for column, ``input_dim`` for row layers, offsets divided by
``pack_factor``). With one rank (``tp_comm`` None) a layer is exactly the unsharded one: the forward adds one branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedllm.distributed.parallel_state import GroupState, divide, get_parallel_state
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
    """Where one shard of a fused projection sits: its index among the shards, its output rows on this rank, and
    which slice of the checkpoint tensor (of ``size`` rows) this rank takes (tensor parallelism; 0 on one rank)."""

    def __init__(self, index: int, offset: int, size: int, rank_index: int = 0, full_size: int | None = None) -> None:
        self.index, self.offset, self.size = index, offset, size
        self.rank_index = rank_index
        self.full_size = size if full_size is None else full_size  # rows of the whole checkpoint tensor


def _rank_slice(loaded: torch.Tensor, dim: int | None, index: int, size: int, pack: int) -> torch.Tensor:
    """Slice ``index`` of ``size`` (unpacked) rows of ``loaded`` along ``dim``; the tensor itself where it already
    has that size (one rank, or a tensor every rank holds)."""
    if dim is None or loaded.dim() <= dim or loaded.shape[dim] == size // pack:
        return loaded
    return loaded.narrow(dim, index * size // pack, size // pack)


def load_into(param: nn.Parameter, loaded: torch.Tensor, shard: _Shard | None, tp: GroupState = GroupState()) -> None:
    """Place a checkpoint tensor in ``param`` following its layout (``add_param``): whole, one shard's slice of
    the output dimension (offsets divided by the packing factor), or one shard's slot of a per-shard value. Under
    tensor parallelism (``tp``) the tensor is first narrowed to this rank's slice (see the module docstring)."""
    if getattr(param, "per_shard", False):
        slot = param.data[0 if shard is None else shard.index]
        _copy_checked(slot, loaded.reshape(slot.shape) if loaded.numel() == slot.numel() else loaded, " (per shard)")
        return
    output_dim = getattr(param, "output_dim", None)
    pack = getattr(param, "pack_factor", 1)
    if tp.size > 1:
        input_dim = getattr(param, "input_dim", None)
        if input_dim is not None and getattr(param, "tp_row", False):
            loaded = _rank_slice(loaded, input_dim, tp.rank, param.shape[input_dim], 1)
        elif shard is None and getattr(param, "tp_column", False):
            loaded = _rank_slice(loaded, output_dim, tp.rank, param.shape[output_dim] * pack, pack)
        elif shard is not None:
            loaded = _rank_slice(loaded, output_dim, shard.rank_index, shard.size, pack)
    if shard is None or output_dim is None:  # a plain layer, or a tensor all shards share (GPTQ's g_idx)
        _copy_checked(param.data, loaded, "")
        return
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
        parallel: str | None = None,
    ) -> None:
        """``parallel``: None (every rank holds the whole layer), ``"column"`` (this rank's output features) or
        ``"row"`` (this rank's input features, outputs summed over the tensor-parallel group)."""
        tp = get_parallel_state().tp if parallel else GroupState()
        if parallel == "column":
            output_size = divide(output_size, tp.size, f"{prefix or 'a layer'}'s output size")
        elif parallel == "row":
            input_size = divide(input_size, tp.size, f"{prefix or 'a layer'}'s input size")
        self._build(input_size, [output_size], bias, quant_config, [prefix], parallel, tp)

    def _build(self, input_size: int, output_sizes: list[int], bias: bool,
               quant_config: QuantizationConfig | None, checkpoint_prefixes: list[str],
               parallel: str | None = None, tp: GroupState = GroupState()) -> None:
        """``input_size`` and ``output_sizes`` are this rank's (already divided under tensor parallelism)."""
        super().__init__()
        self.input_size = input_size
        self.output_size = sum(output_sizes)
        self.tp = tp
        # The all-reduce of a row-parallel layer over more than one rank; None otherwise (the tp=1 hot path).
        self.tp_comm = tp.comm if parallel == "row" and tp.size > 1 else None
        self.quant_method = (UnquantizedLinearMethod() if quant_config is None
                             else quant_config.linear_method(checkpoint_prefixes))
        if tp.size > 1 and not getattr(self.quant_method, "supports_tensor_parallel", False):
            raise ValueError(f"{type(self.quant_method).__name__} does not support tensor_parallel_size > 1 yet "
                             "(dense and FP8 weights do); run this checkpoint with tensor_parallel_size=1")
        self.quant_method.create_weights(self, input_size, output_sizes, torch.get_default_dtype())
        self.bias = (add_param(self, "bias", torch.empty(self.output_size), output_dim=0) if bias else None)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader)
            if tp.size > 1:
                param.tp_column = parallel == "column"  # type: ignore[attr-defined]
                param.tp_row = parallel == "row" and param is not self.bias  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is not None:
            raise ValueError(f"This parameter is not fused; got shard id {shard_id!r}")
        load_into(param, loaded, None, self.tp)

    @property
    def is_dense(self) -> bool:
        """Whether the layer holds a plain ``weight`` [output_size, input_size] in the model's dtype."""
        return isinstance(self.quant_method, UnquantizedLinearMethod)

    # The layer's LoRA adapter slots (``lora/slots.py`` sets them when LoRA is enabled): their delta is added to
    # the product of any quantization method.
    lora: LoRALayerWeights | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_comm is not None:
            return self._forward_row_parallel(x)
        if self.lora is not None:
            return self.lora.apply(x, lambda: self.quant_method.apply(self, x, self.bias))
        return self.quant_method.apply(self, x, self.bias)

    def _forward_row_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial product, summed over the group; the bias is added once, after the sum."""
        y = self.tp_comm.all_reduce(self.quant_method.apply(self, x, None))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        method = type(self.quant_method).__name__
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, method={method}"


class _FusedLinear(Linear):
    """Several projections of the same input stacked along the output dimension, one GEMM for all of them.

    Subclasses name the shards; each shard id maps to a row range of the weight (and bias).
    """

    def __init__(self, input_size: int, shard_sizes: dict[object, int], bias: bool,
                 quant_config: QuantizationConfig | None, checkpoint_prefixes: list[str],
                 tp: GroupState = GroupState(), rank_indices: dict[object, int] | None = None,
                 full_sizes: dict[object, int] | None = None) -> None:
        """``shard_sizes``: each shard's rows on this rank; under tensor parallelism ``rank_indices`` says which
        slice of each checkpoint shard this rank holds and ``full_sizes`` the checkpoint shard's rows."""
        self.shards: dict[object, _Shard] = {}
        offset = 0
        for index, (shard_id, size) in enumerate(shard_sizes.items()):
            rank_index = rank_indices[shard_id] if rank_indices else 0
            self.shards[shard_id] = _Shard(index, offset, size, rank_index, full_sizes[shard_id] if full_sizes else size)
            offset += size
        self._build(input_size, list(shard_sizes.values()), bias, quant_config, checkpoint_prefixes,
                    "column" if tp.size > 1 else None, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None and not getattr(param, "per_shard", False):
            # A checkpoint that stores the projection fused already (Phi-3's qkv_proj, gate_up_proj): whole, or
            # under tensor parallelism cut into its shards, each narrowed to this rank's slice.
            if self.tp.size > 1 and getattr(param, "output_dim", None) is not None:
                pack = getattr(param, "pack_factor", 1)
                pieces = loaded.split([s.full_size // pack for s in self.shards.values()], dim=param.output_dim)
                for shard, piece in zip(self.shards.values(), pieces):
                    load_into(param, piece, shard, self.tp)
                return
            load_into(param, loaded, None, self.tp)
            return
        if shard_id not in self.shards:
            raise ValueError(f"Unknown shard id {shard_id!r}; expected one of {list(self.shards)}")
        load_into(param, loaded, self.shards[shard_id], self.tp)


def _part_prefixes(prefix: str, parts: list[str]) -> list[str]:
    """The checkpoint module names of a fused layer's parts: ``model.layers.0.self_attn`` + ``q_proj`` ..."""
    return [f"{prefix}.{part}" if prefix else part for part in parts]


class QKVLinear(_FusedLinear):
    """Fused q/k/v projection: output rows are [q (num_heads * head_dim), k, v (num_kv_heads * head_dim each)].

    Shard ids are ``"q"``, ``"k"`` and ``"v"``; ``prefix`` is the attention module's name in the checkpoint.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        """``num_heads`` and ``num_kv_heads`` are the model's; under tensor parallelism this rank holds
        ``num_heads / tp`` query heads and the KV heads they read (``num_kv_heads / tp`` of them, or one replicated
        KV head when ``tp > num_kv_heads``): ``self.num_heads`` and ``self.num_kv_heads`` are this rank's."""
        tp = get_parallel_state().tp
        self.num_heads, self.num_kv_heads, rank_index_kv = tp_attention_heads(num_heads, num_kv_heads, tp)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, bias, quant_config,
                         _part_prefixes(prefix, ["q_proj", "k_proj", "v_proj"]), tp,
                         {"q": tp.rank, "k": rank_index_kv, "v": rank_index_kv},
                         {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim})


def tp_attention_heads(num_heads: int, num_kv_heads: int, tp: GroupState) -> tuple[int, int, int]:
    """(query heads, KV heads, index of this rank's KV slice) on rank ``tp.rank`` of ``tp.size``. With more ranks
    than KV heads each rank holds the one KV head its query heads read (``tp / num_kv_heads`` ranks share it)."""
    local_heads = divide(num_heads, tp.size, "num_attention_heads")
    if num_kv_heads >= tp.size:
        return local_heads, divide(num_kv_heads, tp.size, "num_key_value_heads"), tp.rank
    if tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp.size}) must divide or be a multiple of num_key_value_heads "
                         f"({num_kv_heads})")
    return local_heads, 1, tp.rank // (tp.size // num_kv_heads)


class MergedLinear(_FusedLinear):
    """Fused projections of one input (gate/up of the MLP); shard id ``i`` is the ``i``-th of ``output_sizes``,
    stored in the checkpoint under ``part_names[i]`` of the module ``prefix``."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 part_names: list[str] | None = None) -> None:
        tp = get_parallel_state().tp
        full_sizes = dict(enumerate(output_sizes))
        output_sizes = [divide(size, tp.size, f"{prefix or 'a fused layer'}'s output size") for size in output_sizes]
        self.output_sizes = list(output_sizes)  # this rank's
        names = part_names or [str(i) for i in range(len(output_sizes))]
        super().__init__(input_size, dict(enumerate(output_sizes)), bias, quant_config,
                         _part_prefixes(prefix, names), tp, dict.fromkeys(full_sizes, tp.rank), full_sizes)
