"""The messages between the scheduler (pure Python) and the model runner: the only types the worker side sees.

A ``SchedulerOutput`` is a *diff* against the runner's persistent per-request state: new requests arrive with
their full token list and block table, running ones only with the blocks added this step. A request that was
preempted leaves the runner (``finished_req_ids``) and comes back later as a new request carrying its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from pagedllm.lora.request import LoRARequest
from pagedllm.params import SamplingParams
from pagedllm.pooling.params import PoolingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen (or has forgotten after preemption)."""

    req_id: str
    token_ids: list[int]  # prompt + any outputs generated before a preemption
    num_prompt_tokens: int
    sampling_params: SamplingParams
    sampling_seed: int  # seeds this request's sampling: randomness depends on (seed, output index) only
    block_ids: list[int]
    num_computed_tokens: int
    # The request's grammar state (engine-side object, shared in-process), or None when unconstrained.
    structured_output: object | None = None
    lora_request: LoRARequest | None = None  # the adapter it runs with; None = the base model
    # Set (resolved) for an embedding request: the runner pools its prompt's hidden states instead of sampling.
    pooling_params: PoolingParams | None = None


@dataclass(slots=True)
class CachedRequestData:
    """A request already in the runner's batch: what changed since its last step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Set when copy-on-write replaced a block: the whole table (already including new_block_ids).
    block_ids_reset: list[int] | None = None
    # Pipeline parallelism: the request's output tokens among this step's positions, from output index
    # max(0, num_computed_tokens - num_prompt_tokens): the earlier stages learn the last stage's samples from them.
    new_token_ids: list[int] | None = None


@dataclass
class SchedulerOutput:
    """What to compute in one step, in the order the runner must lay the batch out."""

    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step (insertion order = batch order)
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)  # finished, aborted or preempted since the last step
    # KV block copies to make before the forward pass, in this order: swap-outs, copy-on-write copies, swap-ins.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, CPU block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (device block, device block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (CPU block, device block)
    step_id: int = 0  # increasing; names the step whose output updates the scheduler

    @property
    def is_empty(self) -> bool:
        """Nothing to compute (there may still be swaps or finished requests to apply)."""
        return self.total_num_scheduled_tokens == 0

    @property
    def has_work(self) -> bool:
        return bool(self.total_num_scheduled_tokens or self.finished_req_ids or self.blocks_to_swap_out
                    or self.blocks_to_copy or self.blocks_to_swap_in)


class TopLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Logprobs at one position: the chosen token first, then the top-N tokens by probability.

    ``token_ids[0]`` is the sampled (or prompt) token, with its rank (1 = most likely) in ``ranks[0]``; entries
    ``1..N`` are the N most likely tokens with ranks 1..N.
    """

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    """The result of one step, for the requests of the SchedulerOutput."""

    # req_id -> sampled token; only requests whose computed tokens caught up with all their tokens sample.
    sampled_token_ids: dict[str, int]
    # req_id -> logprobs of the sampled token, for requests that asked for logprobs.
    logprobs: dict[str, TopLogprobs] = field(default_factory=dict)
    # req_id -> logprobs of the prompt tokens computed this step (one entry per prompt position > 0).
    prompt_logprobs: dict[str, list[TopLogprobs]] = field(default_factory=dict)
    # Requests whose grammar is complete with this step's token (the runner owns the grammar matchers: the
    # scheduler, possibly a step behind them under async scheduling, learns it from here).
    grammars_terminated: set[str] = field(default_factory=set)
    # req_id -> the pooled vector of an embedding request whose prompt was completed this step (plain floats).
    pooled_outputs: dict[str, list[float]] = field(default_factory=dict)


# ---- what the scheduler hands out after each step (they cross to the front end: see engine/contracts.py) ----------


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What happened to one request (sequence) in one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: TopLogprobs | None = None
    new_prompt_logprobs: list[TopLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    error: str | None = None  # the engine failed this request (finish_reason "abort"): why, about it only
    pooled_output: list[float] | None = None  # an embedding request's vector (it finishes with it)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    """Counters and gauges for metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    num_swap_preemptions_total: int = 0
    num_swapped_out_blocks_total: int = 0
    cpu_kv_cache_usage: float = 0.0
    num_shared_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # With LoRA: the names of the adapters of running / waiting requests (the labels of lora_requests_info).
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)
