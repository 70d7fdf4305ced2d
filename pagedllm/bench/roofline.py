"""The memory roofline: the least time a workload can take when every step must stream the weights and the KV
cache it attends over from device memory at the measured bandwidth.

Model: an ideal continuous batcher runs up to ``max_num_seqs`` requests at once; every step each running request
gains one token (its first from the prefill step); a step reads all weights once (``weight_bytes_per_step``) and,
for each running request, the KV of its whole context. Compute (FLOPs) and kernel launch costs are ignored, so this
is a lower bound on time (an upper bound on tokens/s) for decode-dominated workloads; prefill-heavy ones can be
compute-bound above it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Roofline:
    """Bytes and the least time a workload needs at ``bandwidth_bytes_per_s``."""

    bandwidth_bytes_per_s: float
    weight_bytes_per_step: int
    kv_bytes_per_token: int
    num_steps: int
    weight_bytes: int
    kv_bytes: int
    num_output_tokens: int

    @property
    def min_time_s(self) -> float:
        return (self.weight_bytes + self.kv_bytes) / self.bandwidth_bytes_per_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.min_time_s

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "min_time_s": self.min_time_s, "output_tokens_per_s": self.output_tokens_per_s}


def ideal_num_steps(output_lens: Sequence[int], max_num_seqs: int) -> int:
    """Steps of an ideal FCFS continuous batcher with ``max_num_seqs`` slots, each request holding a slot for as many
    steps as it has output tokens."""
    slots = [0] * min(max_num_seqs, len(output_lens))
    for output_len in output_lens:
        heapq.heapreplace(slots, slots[0] + output_len)
    return max(slots, default=0)


def kv_tokens_read(prompt_lens: Sequence[int], output_lens: Sequence[int]) -> int:
    """Context tokens attended over, summed over every step of every request: sum_k (prompt + k), k < output."""
    return sum(out * prompt + out * (out - 1) // 2 for prompt, out in zip(prompt_lens, output_lens, strict=True))


def roofline(prompt_lens: Sequence[int], output_lens: Sequence[int], max_num_seqs: int, weight_bytes_per_step: int,
             kv_bytes_per_token: int, bandwidth_bytes_per_s: float) -> Roofline:
    num_steps = ideal_num_steps(output_lens, max_num_seqs)
    return Roofline(
        bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        weight_bytes_per_step=weight_bytes_per_step,
        kv_bytes_per_token=kv_bytes_per_token,
        num_steps=num_steps,
        weight_bytes=num_steps * weight_bytes_per_step,
        kv_bytes=kv_tokens_read(prompt_lens, output_lens) * kv_bytes_per_token,
        num_output_tokens=sum(output_lens),
    )


def decode_step_roofline_s(batch_size: int, context_len: float, weight_bytes_per_step: int, kv_bytes_per_token: int,
                           bandwidth_bytes_per_s: float) -> float:
    """Least time of one decode step of ``batch_size`` requests with ``context_len`` tokens of context each."""
    return (weight_bytes_per_step + batch_size * context_len * kv_bytes_per_token) / bandwidth_bytes_per_s
