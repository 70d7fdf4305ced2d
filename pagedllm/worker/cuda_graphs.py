"""CUDA graphs of the model's forward for decode steps, one per padded batch size.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python they cost more CPU
time than the GPU spends running them. A graph captured once per batch size replays them all with one call.
The graphs read their inputs from the step buffers' device tensors (fixed addresses) and write into an output
captured with them; a step of ``n`` decodes runs the smallest graph of at least ``n`` rows, the extra rows
being padding (see ``StepBuffers.fill_padding``). Steps with a prefill run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from pagedllm.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, 8, then every multiple of 8, up to max_num_seqs (included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    """Captured decode forwards, keyed by padded batch size."""

    def __init__(self) -> None:
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._sizes: list[int] = []

    def padded_size(self, num_reqs: int) -> int | None:
        """The smallest captured size that holds ``num_reqs`` decodes, or None if none does."""
        index = bisect.bisect_left(self._sizes, num_reqs)
        return self._sizes[index] if index < len(self._sizes) else None

    def capture(
        self, sizes: list[int], forward: Callable[[int], torch.Tensor], device: torch.device
    ) -> float:
        """Capture ``forward(size)`` (which reads only the step buffers) for each size; returns seconds taken.

        Largest first, all in one memory pool: the smaller graphs reuse the larger ones' activation memory.
        """
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(sizes, reverse=True):
            forward(size)  # warm-up outside the graph: Triton kernels compile, cuBLAS picks its algorithms
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = forward(size)
            self._graphs[size] = graph
        torch.cuda.synchronize(device)
        self._sizes = sorted(self._graphs)
        seconds = time.perf_counter() - start
        logger.info("Captured %d CUDA graphs (batch sizes %d..%d) in %.1f s", len(sizes), min(sizes), max(sizes),
                    seconds)
        return seconds

    def replay(self, padded_size: int) -> torch.Tensor:
        """Run the graph of ``padded_size`` rows on the inputs now in the step buffers; returns its output."""
        self._graphs[padded_size].replay()
        return self._outputs[padded_size]


def decode_metadata(
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seq_len: int,
) -> AttentionMetadata:
    """Metadata of a decode step of ``len(seq_lens)`` rows, whatever the contexts: what a graph is captured with.

    ``max_seq_len`` is an upper bound (the model's max length), so the kernels pick launch shapes that are
    valid for every context the graph will later see.
    """
    num_reqs = seq_lens.shape[0]
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        query_lens_cpu=[1] * num_reqs,
        seq_lens_cpu=[max_seq_len] * num_reqs,
        max_query_len=1,
        max_seq_len=max_seq_len,
    )
