"""What every Triton kernel touching an FP8 KV cache shares: the store's quantization, the scale loads, and the
launch arguments that switch them on (the arithmetic of ``kv_quant.py``, per element in registers).

A kernel gets ``IS_FP8`` and ``FP8_MAX`` as constexprs (a float cache compiles without any of it) and the K and V
scales as pointers to 0-dim float32 device tensors: a CUDA graph then replays with their current values (set by a
checkpoint, or by ``calculate_kv_scales`` on the first step, after capture).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from pagedllm.attention.kv_quant import fp8_max, is_fp8


@triton.jit
def quantize_fp8(x, scale, FP8_MAX: tl.constexpr):
    """``x / scale`` in float32, saturated to the FP8 range; the cast to the cache's dtype at the store rounds it
    (saturating first: a cast alone makes an out-of-range value nan or inf)."""
    return tl.minimum(tl.maximum(x.to(tl.float32) / scale, -FP8_MAX), FP8_MAX)


@triton.jit
def load_scale(scale_ptr, IS_FP8: tl.constexpr):
    """The scale an FP8 cache holds its values divided by; 1.0 for a float cache (the pointer is not read)."""
    if IS_FP8:
        return tl.load(scale_ptr).to(tl.float32)
    return 1.0


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)


def fp8_kernel_args(
    kv_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(k_scale, v_scale, constexprs) for a kernel over ``kv_cache``: a float cache gets placeholder pointers (the
    cache itself: never read, and nothing allocated, which matters inside a graph capture) and IS_FP8=False; an FP8
    cache without scales gets 1.0 (tests)."""
    if not is_fp8(kv_cache.dtype):
        return kv_cache, kv_cache, {"IS_FP8": False, "FP8_MAX": 0.0}
    scales = [_unit_scale(kv_cache.device) if s is None else s for s in (k_scale, v_scale)]
    for scale in scales:
        if scale.numel() != 1 or scale.dtype != torch.float32:
            raise ValueError(f"KV scales must be one float32 value each, got {tuple(scale.shape)} {scale.dtype}")
    return scales[0], scales[1], {"IS_FP8": True, "FP8_MAX": fp8_max(kv_cache.dtype)}
