"""A request as the scheduler sees it: its tokens, how many of them are in the KV cache, and its status."""

from __future__ import annotations

import enum
import itertools
import time

from pagedllm.lora.request import LoRARequest
from pagedllm.params import SamplingParams
from pagedllm.pooling.params import PoolingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    """Life cycle: WAITING -> RUNNING -> ((PREEMPTED | SWAPPED) -> RUNNING)* -> FINISHED_*.

    PREEMPTED requests lost their KV cache and recompute it; SWAPPED ones have it in the CPU pool.
    """

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence to generate. ``num_computed_tokens`` catches up to ``num_tokens`` step by step: prefill,
    chunked prefill, decode and recompute after preemption are all this one rule."""

    __slots__ = (
        "arrival_seq",
        "arrival_time",
        "eos_token_ids",
        "first_scheduled_time",
        "fork_source",
        "lora_request",
        "max_tokens",
        "num_computed_tokens",
        "num_output_placeholders",
        "num_preemptions",
        "output_token_ids",
        "pooling_params",
        "priority",
        "prompt_token_ids",
        "request_id",
        "sampling_params",
        "sampling_seed",
        "status",
        "stop_reason",
        "structured_output",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        sampling_seed: int,
        eos_token_ids: tuple[int, ...],
        max_tokens: int,
        arrival_time: float | None = None,
        priority: int = 0,
        fork_source: str | None = None,
        structured_output: object | None = None,
        lora_request: LoRARequest | None = None,
        pooling_params: PoolingParams | None = None,
    ) -> None:
        self.request_id = request_id
        # Another sequence of the same prompt (parallel sampling): this one starts from its KV blocks, shared.
        self.fork_source = fork_source
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.sampling_seed = sampling_seed
        self.eos_token_ids = eos_token_ids
        self.max_tokens = max_tokens  # resolved: params.max_tokens, or the rest of the context when None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.arrival_seq = next(_arrival_counter)  # total order of arrival, ties impossible
        self.priority = priority
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0  # advanced when a step is scheduled (its KV is written by that step)
        # Tokens being sampled by scheduled steps whose outputs have not arrived yet (at most one per step in
        # flight: async scheduling keeps one step ahead of the outputs).
        self.num_output_placeholders = 0
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        # The request's grammar (an opaque engine-side object: ``is_ready()``, ``error``; the runner advances it),
        # or None for an unconstrained request.
        self.structured_output = structured_output
        self.lora_request = lora_request  # the adapter it runs with (None: the base model)
        # An embedding request: its prompt is computed (prefill only), pooled, and it finishes; nothing is sampled.
        self.pooling_params = pooling_params

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def lora_int_id(self) -> int:
        """The adapter's id, 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """Tokens once every scheduled step has sampled: what ``num_computed_tokens`` catches up to."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_output_placeholders

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
