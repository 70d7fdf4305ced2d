"""Timing of GPU calls for the kernel microbenchmarks: one CUDA graph of many calls, replayed, best of five."""

from __future__ import annotations

import torch


def time_calls(fn, num_calls: int) -> float:
    """Microseconds per call of ``fn(i)`` replayed from one CUDA graph of ``num_calls`` calls."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(num_calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / num_calls)
    return best
