"""The device a benchmark runs on: its name, and its memory bandwidth measured with a large copy."""

from __future__ import annotations

import time

import torch

_GPU_COPY_BYTES = 2 << 30  # 2 GiB: far beyond any cache, as the roofline assumes
_CPU_COPY_BYTES = 256 << 20


def device_name(device: str) -> str:
    """"NVIDIA H200" style names for CUDA devices, "cpu" for the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def measure_bandwidth(device: str, num_bytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written over the time), best of ``repeats``.

    On a GPU the copy is timed with CUDA events; on the CPU it is a memcpy-like ``Tensor.copy_`` timed by the clock.
    """
    is_cuda = device.startswith("cuda")
    num_bytes = num_bytes or (_GPU_COPY_BYTES if is_cuda else _CPU_COPY_BYTES)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page in both buffers
    best = float("inf")
    for _ in range(repeats):
        best = min(best, _timed_copy(dst, src, is_cuda))
    del src, dst
    if is_cuda:
        torch.cuda.empty_cache()
    return 2 * num_bytes / best


def _timed_copy(dst: torch.Tensor, src: torch.Tensor, is_cuda: bool) -> float:
    if not is_cuda:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    dst.copy_(src)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000.0


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
