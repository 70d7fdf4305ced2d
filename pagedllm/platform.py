"""Device detection: which device runs the model, its default dtype, and whether Triton kernels can be used.

Kept free of a top-level torch import so that the pure-Python scheduler side can read it without loading torch.
"""

from __future__ import annotations

import functools


@functools.cache
def cuda_is_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is present, else ``"cpu"``; validate explicit choices."""
    if device == "auto":
        return "cuda" if cuda_is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not cuda_is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, config_dtype: str | None, device: str) -> str:
    """Pick the model dtype name: ``"auto"`` is the checkpoint's dtype on GPU and float32 on CPU."""
    aliases = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}
    dtype = aliases.get(dtype, dtype)
    if dtype == "auto":
        if device == "cpu":
            return "float32"
        config_dtype = aliases.get(config_dtype or "", config_dtype)
        # A float32 checkpoint is served in bfloat16 on GPU, as vLLM does: same range, half the memory.
        return config_dtype if config_dtype in ("float16", "bfloat16") else "bfloat16"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be one of auto, float32, float16, bfloat16, got {dtype!r}")
    return dtype
