"""The per-layer K and V scales of an FP8 KV cache, as model parameters.

Each attention layer holds ``k_scale`` and ``v_scale`` (0-dim float32, 1.0 by default), named as llm-compressor /
compressed-tensors write them (``model.layers.N.self_attn.k_scale``), so a checkpoint's scales load through the
ordinary loader; older checkpoints' ``k_proj.output_scale`` / ``v_proj.output_scale`` are renamed to them, and
the query / probability scales of checkpoints made for FP8 attention math (``q_scale``, ``prob_scale``) are skipped:
only the cache is FP8 here. A checkpoint without scales still loads (the parameters are optional there). With ``calculate_kv_scales`` the first
step sets them from its own keys and values instead. A float cache ignores them.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.kv_quant import is_fp8, kv_scale_for
from pagedllm.model.linear import set_weight_loader

# Older checkpoint names -> ours (the output scale of the k/v projection is the scale of what the cache stores).
_RENAMES = ((".k_proj.output_scale", ".k_scale"), (".v_proj.output_scale", ".v_scale"))
_UNUSED_SCALES = (".self_attn.q_scale", ".self_attn.prob_scale")


def kv_scale_parameter() -> nn.Parameter:
    """A layer's K or V scale: 1.0 until a checkpoint (or the first step, with calculate_kv_scales) sets it."""
    param = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
    set_weight_loader(param, load_kv_scale)
    param.optional_in_checkpoint = True  # type: ignore[attr-defined]  # dense checkpoints have none
    param.dummy_init = _fill_one  # type: ignore[attr-defined]  # random weights keep the scale 1.0
    return param


def _fill_one(data: torch.Tensor, generator: torch.Generator) -> None:
    data.fill_(1.0)


def load_kv_scale(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy a checkpoint's scale. A scale of several values (per head or per channel) becomes their maximum: one
    scale per tensor then saturates no value that the finer scales kept in range."""
    if shard_id is not None:
        raise ValueError(f"A KV scale is not fused; got shard id {shard_id!r}")
    if loaded.numel() == 0:
        raise ValueError("empty KV scale")
    value = loaded.detach().float().amax()
    if not torch.isfinite(value) or value <= 0:
        raise ValueError(f"a KV scale must be positive and finite, got {value.item()}")
    param.data.copy_(value)


def checkpoint_kv_scale_name(name: str) -> str | None:
    """The parameter name of a checkpoint's KV scale under an older spelling, None for an attention scale that
    pagedllm has no use for; any other name unchanged."""
    if name.endswith(_UNUSED_SCALES):
        return None
    for old, new in _RENAMES:
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


@torch.no_grad()
def calibrate_kv_scales(key: torch.Tensor, value: torch.Tensor, k_scale: nn.Parameter, v_scale: nn.Parameter,
                        cache_dtype: torch.dtype) -> None:
    """Set the scales from this step's keys and values (``max |x| / FP8 max``), on the device and in place, so the
    kernels (and captured CUDA graphs) read the new values; nothing to do for a float cache."""
    if is_fp8(cache_dtype) and key.numel():
        k_scale.copy_(kv_scale_for(key, cache_dtype))
        v_scale.copy_(kv_scale_for(value, cache_dtype))
