"""Device detection: which device runs the model, its default dtype, and whether Triton kernels can be used.

Kept free of a top-level torch import so that the pure-Python scheduler side can read it without loading torch.
"""

from __future__ import annotations

import functools


@functools.cache
def cuda_is_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def triton_is_usable() -> bool:
    """Whether Triton kernels can run here: a CUDA device and an importable Triton."""
    if not cuda_is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def triton_ops_enabled() -> bool:
    """Whether the model's fused elementwise kernels (``model/triton_ops.py``) replace the torch ops on CUDA:
    Triton is usable and ``PAGEDLLM_DISABLE_TRITON_OPS=1`` is not set. Decided once per process."""
    from pagedllm.config import triton_ops_disabled_by_env  # lazy: config imports this module

    return triton_is_usable() and not triton_ops_disabled_by_env()


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


def triton_supports(head_dim: int, block_size: int) -> bool:
    """Whether the Triton attention kernels handle these shapes: head_dim up to 256 (padded to a power of two in
    the tiles) and a power-of-two block size."""
    return 0 < head_dim <= 256 and block_size > 0 and block_size & (block_size - 1) == 0


def resolve_attention_backend(name: str, device: str, head_dim: int, block_size: int) -> str:
    """``"auto"``: Triton on CUDA when the shapes allow it (and Triton imports), else the torch reference."""
    if name != "auto":
        if name == "triton" and not triton_supports(head_dim, block_size):
            raise ValueError(
                "The triton attention backend needs head_dim <= 256 and a power-of-two block_size; "
                f"got head_dim={head_dim}, block_size={block_size}"
            )
        return name
    usable = device == "cuda" and triton_is_usable() and triton_supports(head_dim, block_size)
    return "triton" if usable else "torch"



def engine_core_cpu_threads() -> int:
    """Intra-op threads for an engine core that runs the model on the CPU in its own process: all cores but one,
    which is left to the API server process (event loop, tokenizing, detokenizing). Otherwise the server's work
    preempts one of the model's threads in the middle of a step and every op waits for it: measured on 2 busy cores,
    a 300-token stream took 38 s with 2 threads and 3.3 s with 1. ``OMP_NUM_THREADS``, when set, wins."""
    import os

    from pagedllm.config import cpu_threads_from_env  # lazy: config imports this module

    return cpu_threads_from_env() or max(1, len(os.sched_getaffinity(0)) - 1)
