"""Linear layers whose parameters know how to load themselves from a checkpoint.

Each parameter carries ``weight_loader(param, loaded_tensor, shard_id=None)`` (the vLLM pattern): the model loader
maps a checkpoint name onto a parameter (and a shard id for fused projections) and lets the parameter place the
tensor. Tensor-parallel sharding and quantized formats hook in here later by bringing their own loaders.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.platform import triton_ops_enabled

WeightLoader = Callable[..., None]


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    """Attach ``loader`` to ``param`` as its ``weight_loader`` attribute."""
    param.weight_loader = loader  # type: ignore[attr-defined]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy a whole tensor into ``param`` (casting dtype and moving device as needed)."""
    if shard_id is not None:
        raise ValueError(f"This parameter is not fused; got shard id {shard_id!r}")
    if param.shape != loaded.shape:
        raise ValueError(f"Shape mismatch: parameter {tuple(param.shape)}, checkpoint tensor {tuple(loaded.shape)}")
    param.data.copy_(loaded)


@functools.cache
def _skinny_gemm() -> ModuleType:
    """The skinny-GEMM kernel module, imported on first CUDA use so that CPU-only runs never import Triton."""
    from pagedllm.model import skinny_gemm

    return skinny_gemm


def skinny_gemm_for(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """The skinny-GEMM module when ``linear(x, weight)`` runs its kernel (a decode-sized x on CUDA), else None.
    Its fused variants (an RMSNorm or SiLU-and-mul in the kernel's prologue) ride on the same choice."""
    if x.is_cuda and triton_ops_enabled() and _skinny_gemm().accepts(x, weight):
        return _skinny_gemm()
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a decode-sized x on CUDA (a few rows) takes the skinny-GEMM kernel, which
    streams the weight at near memory bandwidth where cuBLAS's tiles for large batches do not."""
    kernels = skinny_gemm_for(x, weight)
    if kernels is not None:
        return kernels.skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """``y = x W^T + b`` with W [output_size, input_size]; not fused, loads with the default loader."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class _FusedLinear(Linear):
    """Several projections of the same input stacked along the output dimension, one GEMM for all of them.

    Subclasses name the shards; each shard id maps to a row range of the weight (and bias).
    """

    def __init__(self, input_size: int, shard_sizes: dict[object, int], bias: bool = False) -> None:
        super().__init__(input_size, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[object, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"Unknown shard id {shard_id!r}; expected one of {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(
                f"Shape mismatch for shard {shard_id!r}: expected {tuple(target.shape)}, "
                f"checkpoint tensor {tuple(loaded.shape)}"
            )
        target.copy_(loaded)


class QKVLinear(_FusedLinear):
    """Fused q/k/v projection: output rows are [q (num_heads * head_dim), k, v (num_kv_heads * head_dim each)].

    Shard ids are ``"q"``, ``"k"`` and ``"v"``.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, bias)


class MergedLinear(_FusedLinear):
    """Fused projections of one input (gate/up of the MLP); shard id ``i`` is the ``i``-th of ``output_sizes``."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, dict(enumerate(output_sizes)), bias)
