"""What the model runner remembers about each request between steps (``CachedRequestState``), built from the
scheduler's ``NewRequestData`` and advanced as tokens are sampled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.core.interface import NewRequestData
from pagedllm.params import SamplingParams
from pagedllm.pooling.params import PoolingParams


@dataclass(slots=True)
class CachedRequestState:
    """What the runner remembers about a request between steps."""

    req_id: str
    token_ids: list[int]  # prompt + outputs known so far (the runner appends what it samples)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    sampling_seed: int
    block_ids: list[int]
    num_computed_tokens: int
    structured_output: Any = None  # the grammar (engine-side object), advanced here with each sampled token
    # Unique over every state the runner has held (from 1), renewed when block_ids are replaced (not extended): a
    # staged block-table row is reused only by the same version (a preempted request comes back with other blocks).
    block_table_version: int = 0
    # The two parts of token_ids as their own lists, kept in step, so the sampler gets them without a copy per step.
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    # Under a grammar: whether the next draw is checked after it rather than masked before it (grammar_sampling).
    draw_checked: bool = False
    lora_request: Any = None  # the request's adapter (LoRARequest), or None for the base model
    # Async scheduling: a token sampled by the step in flight, not yet on the host (0 or 1), and its row in that
    # step's sampled tensor (where the next step reads it on the device).
    num_pending: int = 0
    pending_row: int = 0
    # Whether sampling reads the tokens generated so far (a grammar, penalties): a step with such a row waits for
    # the step in flight first.
    reads_output_history: bool = False
    pooling_params: PoolingParams | None = None  # an embedding request: pooled when its prompt is computed

    @classmethod
    def from_new(cls, data: NewRequestData) -> CachedRequestState:
        token_ids = list(data.token_ids)
        return cls(
            data.req_id,
            token_ids,
            data.num_prompt_tokens,
            data.sampling_params,
            data.sampling_seed,
            list(data.block_ids),
            data.num_computed_tokens,
            data.structured_output,
            prompt_token_ids=token_ids[: data.num_prompt_tokens],
            output_token_ids=token_ids[data.num_prompt_tokens :],
            reads_output_history=data.structured_output is not None or _has_penalties(data.sampling_params),
            lora_request=data.lora_request,
            pooling_params=data.pooling_params,
        )

    def append_output(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def add_carried_outputs(self, num_computed_tokens: int, token_ids: list[int]) -> None:
        """An earlier pipeline stage: output tokens the last stage sampled, from output index
        max(0, num_computed_tokens - num_prompt_tokens) (``CachedRequestData.new_token_ids``); appends those not
        known yet (a request recomputed after preemption came back with its outputs)."""
        first_output = max(num_computed_tokens - self.num_prompt_tokens, 0)
        for token_id in token_ids[len(self.output_token_ids) - first_output :]:
            self.append_output(token_id)

    def resolve_pending(self, token_id: int) -> None:
        """The token the step in flight sampled has reached the host."""
        self.append_output(token_id)
        self.num_pending -= 1


def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
