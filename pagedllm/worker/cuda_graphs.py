"""CUDA graphs of the model's forward: decode steps per padded batch size, small mixed steps per padded token count.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python they cost more CPU
time than the GPU spends running them. A graph captured once per batch size replays them all with one call.
The graphs read their inputs from the step buffers' device tensors (fixed addresses) and write into an output
captured with them; a step of ``n`` decodes runs the smallest graph of at least ``n`` rows, the extra rows
being padding (see ``StepBuffers.fill_padding``).

A step with a prefill (a short prompt, or a prefill chunk among decodes) of up to ``MAX_MIXED_GRAPH_TOKENS`` tokens
replays a *mixed* graph of the smallest captured token count that holds it: at batch 1 such a step is ~300 launches
whose host cost (~19 ms measured on an H200 for Qwen3-0.6B, 32 tokens) is ten times its GPU time. The prefill
attention kernel reads every length from the device, and its launch grid is sized for the padded token and request
counts (programs past a request's queries return at once), so one graph serves any step that fits. Larger steps
are GEMM-bound and run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from pagedllm.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)

# What a captured forward returns: the hidden states (mixed graphs), or the hidden states and the logits, None where
# the LM head runs after the replay (decode graphs).
GraphOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


# Mixed steps of more tokens run eagerly: their launch cost is small beside their GEMMs, and a padded graph's
# prefill grid (requests x kv heads x query blocks, all padded) would grow with the square of the size.
MAX_MIXED_GRAPH_TOKENS = 256
_SMALLEST_MIXED_GRAPH_TOKENS = 16


# Context bounds of the extra decode graphs of small batches. The decode attention kernel's split count is fixed
# when a graph is captured, from an upper bound of the context: a graph captured for max_model_len launches up to
# 64 splits per (request, kv head) and merges them all, even for a 100-token context. Graphs of the same batch sizes
# captured for these bounds launch fewer (at batch 1: one under 256 and 4 under 1024, with each split at least
# ``triton_paged.MIN_TILES_PER_SPLIT`` tiles of 64 keys); a step replays the graph of the smallest bound
# that holds its longest context. Measured on an H200 at batch 1, context 100 (profile_decode_kernels.py): the
# Qwen3-0.6B replay 1.38 -> 1.13 ms with a 256 bound, Llama-3.1-8B 4.47 -> 4.20 ms. Any bound is correct for any
# context (the kernel spreads the context over the splits it has): the bound decides only the parallelism.
DECODE_CONTEXT_BOUNDS = (256, 1024)


def decode_context_bounds(max_model_len: int) -> list[int]:
    """The bounds of the extra decode graphs, ascending: those shorter than max_model_len."""
    return [bound for bound in DECODE_CONTEXT_BOUNDS if bound < max_model_len]


def mixed_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    """Padded token counts of the mixed-step graphs: 16, 32, 64, 128, 256 (those within the step budget)."""
    sizes, size = [], _SMALLEST_MIXED_GRAPH_TOKENS
    while size <= min(MAX_MIXED_GRAPH_TOKENS, max_num_batched_tokens):
        sizes.append(size)
        size *= 2
    return sizes


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, 8, then every multiple of 8, up to max_num_seqs (included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class StepGraphs:
    """Captured forwards, keyed by padded size (requests for decode graphs, tokens for mixed ones)."""

    def __init__(self) -> None:
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, GraphOutput] = {}
        self._sizes: list[int] = []

    def padded_size(self, size: int) -> int | None:
        """The smallest captured size that holds ``size`` (decodes, or tokens), or None if none does."""
        index = bisect.bisect_left(self._sizes, size)
        return self._sizes[index] if index < len(self._sizes) else None

    def capture(
        self, sizes: list[int], forward: Callable[[int], GraphOutput], device: torch.device, pool=None
    ) -> float:
        """Capture ``forward(size)`` (which reads only the step buffers) for each size; returns seconds taken.

        Largest first, all in one memory pool (``pool``, or a new one): the smaller graphs reuse the larger ones'
        activation memory. Graphs sharing a pool must never run at once, and a graph's output is valid only until
        the next replay of any of them: each step replays one and is done with its output before the next.
        """
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
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
        logger.info("Captured %d CUDA graphs (sizes %d..%d) in %.1f s", len(sizes), min(sizes), max(sizes), seconds)
        return seconds

    def replay(self, padded_size: int) -> GraphOutput:
        """Run the graph of ``padded_size`` rows on the inputs now in the step buffers; returns its output."""
        self._graphs[padded_size].replay()
        return self._outputs[padded_size]


DecodeGraphs = StepGraphs  # the name the decode graphs had first


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


def mixed_metadata(
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seq_len: int,
) -> AttentionMetadata:
    """Metadata a mixed-step graph of ``len(slot_mapping)`` tokens and ``len(seq_lens)`` requests is captured with:
    the largest query a step of that many tokens can hold, so the prefill kernel's grid covers any such step."""
    num_tokens, num_reqs = slot_mapping.shape[0], seq_lens.shape[0]
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        query_lens_cpu=[num_tokens] + [0] * (num_reqs - 1),
        seq_lens_cpu=[max_seq_len] * num_reqs,
        max_query_len=num_tokens,
        max_seq_len=max_seq_len,
    )
