"""4-bit checkpoints written in the test: a dense weight quantized by groups (optionally act-order), then packed as
GPTQ (v1 or v2 zeros), AWQ (GEMM layout) or compressed-tensors ``pack-quantized``, plus a whole tiny model
written in one of those formats with the dense weights it stands for (the HF reference runs on those).

The packers follow each format's documented layout; the tests check them bit-exactly against the real libraries'
unpacking code where it is installed (AutoAWQ's ``packing_utils``, compressed-tensors' ``pack_to_int32``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm.model.quantization.awq import AWQ_PACK_ORDER
from pagedllm.model.quantization.int4 import Int4Checkpoint, dequantize_checkpoint, pack_cols, pack_rows

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


@dataclass
class Scheme:
    """How a test checkpoint is quantized and written."""

    fmt: str  # "gptq", "gptq_v2", "awq", "ct"
    group_size: int = 32
    sym: bool = False
    act_order: bool = False


def quantize(weight: torch.Tensor, group_size: int, sym: bool, g_idx: torch.Tensor | None) -> Int4Checkpoint:
    """Round-to-nearest 4-bit quantization of W [N, K] by groups (``g_idx``: each column's group; None: contiguous).
    Scales are float16; asymmetric zeros stay in 1..15 (a GPTQ v1 zero of 0 would be stored as 15 and read as 16)."""
    n, k = weight.shape
    width = k if group_size == -1 else group_size
    groups = g_idx.long() if g_idx is not None else torch.arange(k) // width
    num_groups = k // width
    scales = torch.empty(n, num_groups)
    zeros = torch.empty(n, num_groups, dtype=torch.int64)
    for g in range(num_groups):
        cols = weight[:, groups == g]
        if sym:
            scales[:, g] = cols.abs().amax(1).clamp_min(1e-6) / 7.5
            zeros[:, g] = 8
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scales[:, g] = ((hi - lo) / 15).clamp_min(1e-6)
            zeros[:, g] = torch.round(-lo / scales[:, g].half().float()).clamp(1, 15)
    scales = scales.half()
    q = torch.round(weight / scales.float()[:, groups]) + zeros[:, groups]
    return Int4Checkpoint(q.clamp(0, 15).long(), scales, None if sym else zeros, g_idx, group_size)


def act_order_g_idx(k: int, group_size: int, seed: int) -> torch.Tensor:
    """A GPTQ-style act-order g_idx: the columns in a random (Hessian) order fill groups one after another."""
    width = k if group_size == -1 else group_size
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // width).to(torch.int32)
    return g_idx


def pack_awq_cols(values: torch.Tensor) -> torch.Tensor:
    """[R, C] -> int32 [R, C / 8] in AWQ's interleaved order (word j's nibble p holds column 8 j + order[p])."""
    order = torch.tensor(AWQ_PACK_ORDER)
    index = (torch.arange(0, values.shape[1], 8)[:, None] + order).reshape(-1)
    return pack_cols(values[:, index])


def zeros_or_eight(ckpt: Int4Checkpoint) -> torch.Tensor:
    return ckpt.zeros if ckpt.zeros is not None else torch.full_like(ckpt.scales, 8, dtype=torch.int64)


def pack(ckpt: Int4Checkpoint, fmt: str) -> dict[str, torch.Tensor]:
    """A layer's checkpoint tensors in format ``fmt`` (names relative to the module)."""
    n, k = ckpt.q.shape
    zeros = zeros_or_eight(ckpt)
    if fmt in ("gptq", "gptq_v2"):
        stored = (zeros - 1) & 0xF if fmt == "gptq" else zeros
        g_idx = ckpt.g_idx if ckpt.g_idx is not None else (
            torch.arange(k) // (k if ckpt.group_size == -1 else ckpt.group_size))
        return {"qweight": pack_rows(ckpt.q.t()), "qzeros": pack_cols(stored.t()),
                "scales": ckpt.scales.t().contiguous(), "g_idx": g_idx.to(torch.int32)}
    if fmt == "awq":
        return {"qweight": pack_awq_cols(ckpt.q.t().contiguous()), "qzeros": pack_awq_cols(zeros.t().contiguous()),
                "scales": ckpt.scales.t().contiguous()}
    if fmt == "ct":
        # The packing is the library's own; where it is not installed (the GPU image), every test packing one skips.
        pack_to_int32 = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers").pack_to_int32
        tensors = {"weight_packed": pack_to_int32((ckpt.q - 8).to(torch.int8), 4),
                   "weight_scale": ckpt.scales.clone(), "weight_shape": torch.tensor([n, k])}
        if ckpt.zeros is not None:
            tensors["weight_zero_point"] = pack_to_int32((ckpt.zeros - 8).to(torch.int8), 4, packed_dim=0)
        if ckpt.g_idx is not None:
            tensors["weight_g_idx"] = ckpt.g_idx.to(torch.int32)
        return tensors
    raise ValueError(fmt)


def quantization_config(scheme: Scheme) -> dict:
    """The ``quantization_config`` each library writes into config.json for ``scheme``."""
    if scheme.fmt in ("gptq", "gptq_v2"):
        return {"quant_method": "gptq", "bits": 4, "group_size": scheme.group_size, "desc_act": scheme.act_order,
                "sym": scheme.sym, "checkpoint_format": scheme.fmt}
    if scheme.fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": scheme.group_size, "zero_point": True,
                "version": "gemm"}
    weights = {"num_bits": 4, "type": "int", "symmetric": scheme.sym, "dynamic": False,
               "strategy": "group" if scheme.group_size != -1 else "channel",
               "group_size": scheme.group_size if scheme.group_size != -1 else None,
               "actorder": "group" if scheme.act_order else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
            "ignore": ["lm_head"], "quantization_status": "compressed"}


def write_quantized_model(dense_dir: str, out_dir: Path, scheme: Scheme) -> dict[str, torch.Tensor]:
    """Copy the tiny model at ``dense_dir`` to ``out_dir`` with every projection quantized in ``scheme``; return the
    dequantized dense weights (float32) by checkpoint name, for the HF reference."""
    out_dir.mkdir(parents=True)
    tensors = load_file(Path(dense_dir) / "model.safetensors")
    dense: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.endswith(LINEAR_NAMES)):
            continue
        weight = tensors.pop(name).float()
        # One act-order per layer input: q/k/v (and gate/up) see the same activations, hence the same order.
        g_idx = (act_order_g_idx(weight.shape[1], scheme.group_size, seed=_input_seed(module))
                 if scheme.act_order else None)
        ckpt = quantize(weight, scheme.group_size, scheme.sym, g_idx)
        dense[name] = dequantize_checkpoint(ckpt)
        tensors.update({f"{module}.{key}": value for key, value in pack(ckpt, scheme.fmt).items()})
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(dense_dir) / "config.json").read_text())
    config["quantization_config"] = quantization_config(scheme)
    (out_dir / "config.json").write_text(json.dumps(config))
    return dense


def _input_seed(module: str) -> int:
    """The same seed for projections of one input: q/k/v, gate/up; its own for o and down."""
    layer, part = module.split(".layers.")[1].split(".", 1)
    shared = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
              "mlp.up_proj": "mlp.gate_proj"}.get(part, part)
    return int(layer) * 100 + LINEAR_NAMES.index(shared)
