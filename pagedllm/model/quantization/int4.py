"""4-bit weight-only (W4A16) core shared by GPTQ, AWQ and compressed-tensors ``pack-quantized``: the one layout every
format is repacked into at load, the torch dequantize-then-matmul path (the CPU path and the kernels' oracle), and
the ``LinearMethod`` base the three formats subclass.

The canonical layout of a layer W [N, K] (``Int4Weight``):

- ``qweight`` int32 [N, Kp / 8], K padded to a multiple of ``TILE_K`` (128) with zeros: unsigned 4-bit values,
  tiled along K so that a tile unpacks without moving values between threads. Word ``w`` (0..15) of a row's tile
  ``t`` holds, in bits ``4 i``, column ``128 t + 16 i + w``: shifting a [rows, 16] block of words right by ``4 i``
  gives the contiguous columns ``128 t + 16 i ...`` as one [rows, 16] operand of a dot. (A plain sequential
  packing needs a [rows, 16, 8] -> [rows, 128] reshape in the kernel, which Triton lowers through a layout
  conversion: that ran at ~0.1-0.6 TB/s on an H200, benchmarks/h200/issue16-w4a16.)
- ``scales`` [N, G] and ``zeros`` uint8 [N, G] (None for a symmetric scheme: zero ``2^(bits-1)``), group ``g``
  covering kernel columns ``g * group_size ...``; ``W[n, k] = (q - zero) * scale`` computed in float32.
- ``perm`` int64 [K] or None: act-order (GPTQ ``desc_act``, compressed-tensors ``actorder: group``) stores groups
  that are not contiguous in K; the columns are sorted by group at load, so the kernel's K loop meets each group
  in one piece, and the kernel reads input column ``perm[k]`` for its column ``k``.

Each format's ``process_weights_after_loading`` unpacks its checkpoint tensors to integer matrices
(``Int4Checkpoint``) and ``to_canonical`` does the rest, so the format modules only know their own bit layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model.quantization.base import DummyInit, LinearMethod, replace_param

PACK_FACTOR = 8  # 4-bit values per int32
TILE_K = 128  # columns per tile of the canonical layout (module docstring)
_WORDS_PER_TILE = TILE_K // PACK_FACTOR
SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
_SHIFTS = tuple(range(0, 32, 4))
SYMMETRIC_ZERO = 8  # the zero of a symmetric 4-bit scheme: (q - 8) * scale
# Canonical parameter names on a layer after loading (checkpoint names are replaced by these).
CANONICAL_PARAMS = ("qweight", "scales", "zeros", "perm")


def check_scheme(bits: int, group_size: int, where: str) -> None:
    """A clear error for a scheme pagedllm cannot run (``where`` names the format)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: {bits}-bit weights are not supported; pagedllm runs 4-bit only")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{where}: group size {group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}")


def num_groups(input_size: int, group_size: int, where: str) -> int:
    """Groups along K (``group_size`` -1: one group), checking that K is packable and split evenly."""
    if input_size % PACK_FACTOR:
        raise ValueError(f"{where}: input size {input_size} is not a multiple of {PACK_FACTOR} (4-bit packing)")
    if group_size == -1:
        return 1
    if input_size % group_size:
        raise ValueError(f"{where}: input size {input_size} is not a multiple of the group size {group_size}")
    return input_size // group_size


# -- bit packing ----------------------------------------------------------------------------------------------------


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> int32 [R, C] of 4-bit values, value ``8 j + i`` of a row from bits ``4 i`` of word j."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R / 8, C] -> int32 [R, C], packed along rows the same way (GPTQ's ``qweight``)."""
    return unpack_cols(packed.t().contiguous()).t().contiguous()


def pack_cols(values: torch.Tensor) -> torch.Tensor:
    """The inverse of ``unpack_cols``: int [R, C] of 0..15 -> int32 [R, C / 8]."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=values.device)
    nibbles = values.to(torch.int64).reshape(values.shape[0], -1, PACK_FACTOR) << shifts
    # The nibbles occupy disjoint bits, so their sum is their bitwise or; summed in int64, then the low 32 bits
    # reinterpreted as int32 (bit 31 set gives a negative word, as the checkpoints store it).
    words = nibbles.sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """The inverse of ``unpack_rows``: int [R, C] -> int32 [R / 8, C]."""
    return pack_cols(values.t().contiguous()).t().contiguous()


def pack_tiled(values: torch.Tensor) -> torch.Tensor:
    """int [N, K] of 0..15 -> the canonical int32 [N, Kp / 8] (K padded with zeros to a multiple of TILE_K)."""
    n, k = values.shape
    padded = F.pad(values.to(torch.int32), (0, -k % TILE_K))
    # [N, tile, i, w] (column 128 t + 16 i + w) -> [N, tile, w, i]: sequential packing then puts column
    # 128 t + 16 i + w in word 16 t + w, bits 4 i.
    tiles = padded.reshape(n, -1, PACK_FACTOR, _WORDS_PER_TILE).transpose(2, 3)
    return pack_cols(tiles.reshape(n, -1))


def unpack_tiled(qweight: torch.Tensor, input_size: int) -> torch.Tensor:
    """The inverse of ``pack_tiled``: int32 [N, input_size] of 0..15."""
    n = qweight.shape[0]
    tiles = unpack_cols(qweight).reshape(n, -1, _WORDS_PER_TILE, PACK_FACTOR).transpose(2, 3)
    return tiles.reshape(n, -1)[:, :input_size]


# -- the canonical layout -------------------------------------------------------------------------------------------


@dataclass
class Int4Checkpoint:
    """A layer's checkpoint, unpacked: ``q`` [N, K] of 0..15, ``scales`` [N, G] float, ``zeros`` [N, G] integers
    (None: symmetric, zero 8) and ``g_idx`` [K] (each column's group; None: column k in group k // group_size)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    group_size: int  # -1: one group


@dataclass
class Int4Weight:
    """The canonical layout (module docstring), as the kernel and the torch path read it."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    group_size: int  # columns per group, K for one group
    input_size: int  # K (qweight's columns are padded to a multiple of TILE_K)


def to_canonical(ckpt: Int4Checkpoint, scale_dtype: torch.dtype, where: str) -> Int4Weight:
    """Sort act-order columns by group, pack along K, and check the pieces agree in shape."""
    n, k = ckpt.q.shape
    group_size = k if ckpt.group_size == -1 else ckpt.group_size
    groups = k // group_size
    for name, tensor in (("scales", ckpt.scales), ("zeros", ckpt.zeros)):
        if tensor is not None and tuple(tensor.shape) != (n, groups):
            raise ValueError(f"{where}: {name} have shape {tuple(tensor.shape)}, expected {(n, groups)} for "
                             f"a weight [{n}, {k}] in groups of {group_size}")
    perm = _act_order_perm(ckpt.g_idx, group_size, groups, where)
    q = ckpt.q if perm is None else ckpt.q[:, perm]
    return Int4Weight(pack_tiled(q), ckpt.scales.to(scale_dtype).contiguous(), _stored_zeros(ckpt.zeros), perm,
                      group_size, k)


def _stored_zeros(zeros: torch.Tensor | None) -> torch.Tensor | None:
    """The zeros to keep, as uint8; None when there are none or all are the symmetric midpoint (GPTQ's symmetric
    checkpoints store them all): the kernels then use the constant, with no zero loads (fewer instructions a
    weight, one re-layout less per tile in the tl.dot kernel)."""
    if zeros is None or (not zeros.is_meta and bool((zeros == SYMMETRIC_ZERO).all())):
        return None
    return zeros.to(torch.uint8)  # (meta: a model sized, not loaded, counts the bytes the zeros could take)


def _act_order_perm(g_idx: torch.Tensor | None, group_size: int, groups: int, where: str) -> torch.Tensor | None:
    """None when column k is in group k // group_size; else the stable sort of the columns by group, which must
    then give every group exactly ``group_size`` columns (what GPTQ and llm-compressor write)."""
    if g_idx is None or g_idx.is_meta:  # meta: a model sized, not loaded (the order changes no byte count)
        return None
    k = g_idx.numel()
    contiguous = torch.arange(k, device=g_idx.device) // group_size
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, contiguous):
        return None
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"{where}: g_idx has groups outside 0..{groups - 1}")
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], contiguous):
        raise ValueError(f"{where}: g_idx does not give every group {group_size} columns; pagedllm cannot sort "
                         "its columns into contiguous groups")
    return perm


def dequantize(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype``, columns in the kernel's (sorted) order: ``(q - zero) * scale`` in float32."""
    q = unpack_tiled(weight.qweight, weight.input_size).float()
    n, k = q.shape
    zeros = (float(SYMMETRIC_ZERO) if weight.zeros is None
             else weight.zeros.float().repeat_interleave(weight.group_size, dim=1))
    scales = weight.scales.float().repeat_interleave(weight.group_size, dim=1)
    return ((q - zeros) * scales).to(dtype).reshape(n, k)


def dequantize_checkpoint(ckpt: Int4Checkpoint, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense W [N, K] a checkpoint stands for, in its own column order (the tests' reference)."""
    k = ckpt.q.shape[1]
    group_size = k if ckpt.group_size == -1 else ckpt.group_size
    groups = ckpt.g_idx.long() if ckpt.g_idx is not None else torch.arange(k, device=ckpt.q.device) // group_size
    zeros = float(SYMMETRIC_ZERO) if ckpt.zeros is None else ckpt.zeros.float()[:, groups]
    return ((ckpt.q.float() - zeros) * ckpt.scales.float()[:, groups]).to(dtype)


def torch_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + bias`` by dequantizing W to ``x``'s dtype first: the CPU path and the kernels' oracle."""
    if weight.perm is not None:
        x = x.index_select(-1, weight.perm)
    return F.linear(x, dequantize(weight, x.dtype), bias)


# -- the linear method base -----------------------------------------------------------------------------------------


def layer_weight(layer: nn.Module) -> Int4Weight:
    """The canonical weight stored on ``layer`` by ``Int4LinearMethod.process_weights_after_loading``."""
    return Int4Weight(layer.qweight, layer.scales, layer.zeros, layer.perm, layer.int4_group_size,
                      layer.int4_input_size)


def store_weight(layer: nn.Module, weight: Int4Weight, checkpoint_params: tuple[str, ...]) -> None:
    """Replace the layer's checkpoint parameters by the canonical ones (freeing the originals)."""
    for name in checkpoint_params:
        if name not in CANONICAL_PARAMS and name in layer._parameters:
            delattr(layer, name)
    for name in CANONICAL_PARAMS:
        tensor = getattr(weight, name)
        if tensor is None:
            if name in layer._parameters:
                delattr(layer, name)
            setattr(layer, name, None)
        elif name in layer._parameters:
            replace_param(layer, name, tensor)
        else:
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    layer.int4_group_size = weight.group_size
    layer.int4_input_size = weight.input_size


class Int4LinearMethod(LinearMethod):
    """W4A16 for one format: subclasses register the format's parameters (``create_weights``) and unpack them
    (``unpack``); repacking, dispatch to the kernel and the torch path are shared."""

    scale_dtype: torch.dtype = torch.float16  # the canonical scales' dtype (GPTQ and AWQ store float16)
    format_name: str = "int4"

    def unpack(self, layer: nn.Module) -> Int4Checkpoint:
        """The layer's loaded checkpoint tensors as integer matrices (see ``Int4Checkpoint``)."""
        raise NotImplementedError

    def checkpoint_params(self) -> tuple[str, ...]:
        """The names ``create_weights`` registers, which the canonical ones replace after loading."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        with torch.no_grad():
            weight = to_canonical(self.unpack(layer), self.canonical_scale_dtype(layer), self.format_name)
        store_weight(layer, weight, self.checkpoint_params())

    def canonical_scale_dtype(self, layer: nn.Module) -> torch.dtype:
        return self.scale_dtype

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer_weight(layer)
        if x.is_cuda and _kernels_enabled():
            from pagedllm.model import w4a16_kernel

            return w4a16_kernel.w4a16_linear(x, weight, bias)
        return torch_linear(x, weight, bias)


def _kernels_enabled() -> bool:
    from pagedllm.platform import triton_ops_enabled

    return triton_ops_enabled()


# -- dummy weights (load_format="dummy") ----------------------------------------------------------------------------


def random_packed(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """Fill an int32 tensor with random bits: every 4-bit value uniform in 0..15."""
    tensor.copy_(torch.randint(-2**31, 2**31, tensor.shape, generator=generator, device=tensor.device,
                               dtype=torch.int64).to(torch.int32))


def constant_nibbles(value: int) -> DummyInit:
    """A dummy packed tensor whose every 4-bit value is ``value`` (a symmetric checkpoint's zeros)."""
    word = value * 0x11111111
    word = word - (1 << 32) if word >= 1 << 31 else word  # as int32 stores it

    def fill(tensor: torch.Tensor, generator: torch.Generator) -> None:
        tensor.fill_(word)

    return fill


def small_scales(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """Positive scales giving dequantized weights of about the dense dummy's spread (N(0, 0.02^2)): (q - 8) of
    uniform q has a standard deviation of ~4.6."""
    tensor.uniform_(0.003, 0.006, generator=generator)


def contiguous_groups(group_size: int) -> DummyInit:
    """A dummy ``g_idx`` (any leading per-shard dims): column k in group k // group_size."""

    def fill(tensor: torch.Tensor, generator: torch.Generator) -> None:
        k = tensor.shape[-1]
        tensor.copy_((torch.arange(k, device=tensor.device) // (k if group_size == -1 else group_size))
                     .expand_as(tensor))

    return fill

