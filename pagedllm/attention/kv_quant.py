"""FP8 KV cache arithmetic in torch: the store's quantization and the read's dequantization.

A cache tensor's dtype says what it holds. A ``float8_e4m3fn`` / ``float8_e5m2`` cache holds ``x / scale``
saturated to the format's range (one scale per layer for K and one for V: 0-dim float32 tensors on the device, so
CUDA graphs read their current values); any other cache holds ``x`` itself and the scales are ignored. The torch
backend (the oracle) and the model (scales from a first step) use these functions; the Triton kernels do the same
arithmetic per element in registers.
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_CACHE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# A scale computed from all-zero keys would be 0 and turn every stored value into inf/nan: floor it.
_MIN_SCALE = 1e-12


def kv_cache_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a KV cache dtype name (``EngineConfig.kv_cache_dtype``)."""
    if name not in _CACHE_DTYPES:
        raise ValueError(f"Unknown KV cache dtype {name!r}; expected one of {', '.join(_CACHE_DTYPES)}")
    return _CACHE_DTYPES[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 format (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the cache stores it: ``x / scale`` saturated to the FP8 range and cast, or ``x`` cast for a float
    cache. Saturating first matters: a cast alone turns an out-of-range value into nan (e4m3fn) or inf (e5m2)."""
    if not is_fp8(cache_dtype):
        return x.to(cache_dtype)
    limit = fp8_max(cache_dtype)
    scaled = x.float() if scale is None else x.float() / scale
    return scaled.clamp(-limit, limit).to(cache_dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache contents back in ``dtype``: ``x * scale`` (in float32, then rounded) for FP8, a cast otherwise."""
    if not is_fp8(x.dtype):
        return x.to(dtype)
    return (x.float() if scale is None else x.float() * scale).to(dtype)


def kv_scale_for(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """The per-tensor scale that maps ``max |x|`` onto the FP8 format's largest value (0-dim float32, computed
    on the device without a host sync)."""
    return (x.detach().abs().amax().float() / fp8_max(cache_dtype)).clamp_min(_MIN_SCALE)


def as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """A 1-byte cache viewed as uint8 (the same memory): torch lacks some copies for FP8 on CPU (index_copy_)."""
    return cache.view(torch.uint8) if cache.element_size() == 1 else cache
