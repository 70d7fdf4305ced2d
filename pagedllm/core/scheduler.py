"""Continuous batching: each step, decide which requests run and how many tokens each computes.

The one rule: a request's ``num_computed_tokens`` catches up to its ``num_tokens``. Running requests go first
(in queue order), each taking as many tokens as the step's budget allows — a decode takes 1, a (chunked)
prefill takes the rest of its prompt or a chunk of it. When the pool has no block for a running request, the
last running request in queue order is preempted (its blocks freed, to be recomputed later). Waiting requests
are admitted in queue order while the budget, ``max_num_seqs`` and free blocks allow, and never in a step that
had to preempt. Finished requests leave (and free their blocks) as soon as their last token is known.

A preempted request either recomputes its KV cache when re-admitted, or has its blocks swapped to the CPU pool
and back. ``preemption_mode="auto"`` swaps when the CPU pool has room and the request has at least
``SWAP_MIN_TOKENS`` computed tokens (recomputing a short context costs less than copying its blocks out and in
again); "swap" swaps whenever the CPU pool has room; "recompute" never swaps.

A step that raises does not fail the batch: its requests are requeued for recompute (no KV the step may have
written is trusted or left findable in the prefix cache) and the ``Quarantine`` runs them in ever smaller groups
until the request that makes the step fail runs alone, fails, and is finished with an error; the others go on.

A step's tokens count as computed as soon as the step is scheduled (the step writes their KV before any later
step reads it: steps run in order on the device), and a request that will sample in the step holds a placeholder
for that token until the step's output arrives (``update_from_output``). So the scheduler can plan step N+1 while
step N runs (async scheduling: the runner feeds step N's sampled tokens to step N+1 on the device); a request
whose placeholder may be its last token (``max_tokens``, the context limit) waits for it, and a request preempted
with a placeholder is re-admitted only once the token is known. Synchronously, every placeholder is resolved before
the next schedule and the two ways give the same tokens.

Under pipeline parallelism (``pipeline_parallel_size`` stages) the engine keeps one step in flight per stage. A
request whose sampled token has not reached the host is not scheduled again (the first stage needs that token as
its input, and only the last stage has it), while a prefill chunk that samples nothing may follow its previous chunk
in the next step (each stage runs the steps in order, so the chunk's KV is there). A step takes at most
1/``pipeline_parallel_size`` of the running requests, so the decode batch splits into one group per stage and the
steps in flight hold disjoint requests; each scheduled request carries the sampled tokens it feeds this step
(``CachedRequestData.new_token_ids``), by which the earlier stages learn what the last one sampled.

Queue order is arrival order under the "fcfs" policy, and (priority, arrival) under "priority" (lower priority
values first). Under "priority", a waiting request that does not fit also preempts running requests of a
strictly lower priority (higher value), latest first, until it fits.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pagedllm.config import SchedulerConfig
from pagedllm.core.interface import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
)
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.quarantine import Quarantine
from pagedllm.core.request import Request, RequestStatus

SWAP_MIN_TOKENS = 256


class Scheduler:
    """Owns the waiting queue, the running batch and the KV cache manager."""

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 pipeline_parallel_size: int = 1) -> None:
        self.config = config
        self.num_stages = pipeline_parallel_size  # > 1: steps in flight hold disjoint requests (module docstring)
        self.kv_cache_manager = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self._key = _priority_then_arrival if config.policy == "priority" else _arrival
        self.waiting: list[Request] = []  # in queue order; preempted requests go back to their place
        self.running: list[Request] = []  # in queue order: the tail is the first to preempt
        self._finished_since_last_step: set[str] = set()
        self._runner_knows: set[str] = set()  # requests in the model runner's persistent batch
        self.num_preemptions_total = 0
        self.num_swap_preemptions_total = 0
        self.num_swapped_out_blocks_total = 0
        self._swap_out: list[tuple[int, int]] = []  # this step's swap-outs, handed to the runner
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of which found cached
        self._pending_outputs: list[EngineCoreOutput] = []
        # The requests of each scheduled step whose output has not arrived yet, by step id: an output belongs to
        # the Request objects the step ran, not to a later request that reuses a finished one's id.
        self._unfinished_steps: dict[int, dict[str, Request]] = {}
        self._step_ids = itertools.count(1)
        # Finding one culprit among max_num_seqs takes about log2(max_num_seqs) + 1 failed steps in a row; a few more
        # than that, with no step succeeding, means the engine fails whatever it runs.
        self._quarantine = Quarantine(max_consecutive_failures=config.max_num_seqs.bit_length() + 3)

    # ---- requests in and out -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"Request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=self._key)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside the step (abort, or a stop string found by the detokenizer)."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            (self.running if request.status == RequestStatus.RUNNING else self.waiting).remove(request)
            self._finish(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def engine_fault(self) -> str | None:
        """Why steps keep failing with no request to blame (None when healthy, or since a normal step succeeded)."""
        return self._quarantine.engine_fault

    @property
    def is_isolating_failure(self) -> bool:
        """Whether the quarantine is at work after a failed step (steps then run one at a time)."""
        return self._quarantine.is_engaged

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            num_preemptions_total=self.num_preemptions_total,
            num_swap_preemptions_total=self.num_swap_preemptions_total,
            num_swapped_out_blocks_total=self.num_swapped_out_blocks_total,
            cpu_kv_cache_usage=self.kv_cache_manager.cpu_usage,
            num_shared_blocks=self.kv_cache_manager.pool.num_shared_blocks,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            running_lora_adapters=_lora_names(self.running) if self.config.max_loras else [],
            waiting_lora_adapters=_lora_names(self.waiting) if self.config.max_loras else [],
        )

    # ---- one step ------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts, reserving their KV slots."""
        if self._quarantine.is_probing:
            probe = self._quarantine.probe(self.requests)
            if probe:
                return self._schedule_only(probe)
        return self._schedule()

    def _schedule(self) -> SchedulerOutput:
        budget = _Budget(self.config.max_num_batched_tokens)
        output = SchedulerOutput([], [], {}, 0, step_id=next(self._step_ids))
        if self.config.policy == "priority":
            self._make_room_for_higher_priority()
        preempted = self._schedule_running(budget, output)
        if not preempted:
            self._schedule_waiting(budget, output)
        output.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget.tokens_left
        output.blocks_to_swap_out, self._swap_out = self._swap_out, []
        output.blocks_to_copy = self.kv_cache_manager.take_pending_copies()
        # Includes this step's preemptions: the runner drops them before adding this step's new requests.
        output.finished_req_ids, self._finished_since_last_step = self._finished_since_last_step, set()
        if output.num_scheduled_tokens:
            if self.num_stages > 1:
                self._carry_sampled_tokens(output)
            self._advance_scheduled(output)
        return output

    def _carry_sampled_tokens(self, output: SchedulerOutput) -> None:
        """Pipeline parallelism: only the last stage samples, so each scheduled request carries the sampled tokens
        this step feeds in (its outputs among the scheduled positions; all on the host by now) to the earlier stages."""
        for data in output.cached_reqs:
            request = self.requests[data.req_id]
            first_output = data.num_computed_tokens - request.num_prompt_tokens
            end_output = first_output + output.num_scheduled_tokens[data.req_id]
            if end_output > 0:
                data.new_token_ids = request.output_token_ids[max(first_output, 0) : end_output]

    def _advance_scheduled(self, output: SchedulerOutput) -> None:
        """Count the step's tokens as computed, and give each request that samples in it a placeholder."""
        requests = {request_id: self.requests[request_id] for request_id in output.num_scheduled_tokens}
        for request_id, num_new in output.num_scheduled_tokens.items():
            request = requests[request_id]
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens_with_placeholders and not request.is_pooling:
                request.num_output_placeholders += 1
        self._unfinished_steps[output.step_id] = requests

    def _schedule_only(self, request_ids: set[str]) -> SchedulerOutput:
        """Schedule the quarantine's probe group alone: every other request is held out of the queues for this step."""
        held_running = [request for request in self.running if request.request_id not in request_ids]
        held_waiting = [request for request in self.waiting if request.request_id not in request_ids]
        self.running = [request for request in self.running if request.request_id in request_ids]
        self.waiting = [request for request in self.waiting if request.request_id in request_ids]
        try:
            output = self._schedule()
        finally:
            self.running = sorted(self.running + held_running, key=self._key)
            self.waiting = sorted(self.waiting + held_waiting, key=self._key)
        if not output.num_scheduled_tokens:
            self._quarantine.release_probe()  # it cannot run now: never stall everyone on it
        return output

    def _schedule_running(self, budget: _Budget, output: SchedulerOutput) -> bool:
        preempted = False
        index = 0
        # Pipeline parallelism: one group of the running requests per stage (module docstring).
        max_requests = -(-len(self.running) // self.num_stages)
        while index < len(self.running) and budget.tokens_left > 0 and len(output.cached_reqs) < max_requests:
            request = self.running[index]
            if self._waits_for_sample(request):
                index += 1
                continue
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens, budget.tokens_left)
            new_block_ids = self.kv_cache_manager.allocate_slots(request, num_new)
            while new_block_ids is None:
                preempted = True
                victim = self.running[-1]  # last in queue order, and not yet scheduled this step
                self._preempt(victim)
                if victim is request:
                    break
                new_block_ids = self.kv_cache_manager.allocate_slots(request, num_new)
            if new_block_ids is None:
                break
            output.cached_reqs.append(
                CachedRequestData(
                    request.request_id,
                    new_block_ids,
                    request.num_computed_tokens,
                    block_ids_reset=self.kv_cache_manager.take_rewritten_table(request.request_id),
                )
            )
            output.num_scheduled_tokens[request.request_id] = num_new
            budget.tokens_left -= num_new
            index += 1
        return preempted

    def _waits_for_sample(self, request: Request) -> bool:
        """Whether a running request sits this step out for what a step in flight samples for it: a token that can
        be its last (by length: computing past the end would waste a step), or any token under pipeline parallelism
        (the first stage needs it as input); for an embedding request, its vector (its whole prompt is computed)."""
        if request.is_pooling:
            return request.num_computed_tokens >= request.num_prompt_tokens
        if not request.num_output_placeholders:
            return False
        return (self.num_stages > 1
                or request.num_output_tokens + request.num_output_placeholders >= request.max_tokens
                or request.num_tokens_with_placeholders >= self.config.max_model_len)

    def _make_room_for_higher_priority(self) -> None:
        """Preempt running requests of lower priority than the head of the queue until the head fits."""
        if not self.waiting:
            return
        head = self.waiting[0]
        blocks_needed = self.kv_cache_manager.num_blocks_needed(head, min(head.num_tokens, self.config.max_num_batched_tokens))
        while self.running and self.running[-1].priority > head.priority and (
            len(self.running) >= self.config.max_num_seqs or self.kv_cache_manager.num_free_blocks < blocks_needed
        ):
            self._preempt(self.running[-1])

    def _schedule_waiting(self, budget: _Budget, output: SchedulerOutput) -> None:
        index = 0
        running_loras = self._running_loras()
        while index < len(self.waiting) and budget.tokens_left > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[index]
            if self._waits_for_fork_source(request) or request.num_output_placeholders:
                # A later sequence of a prompt whose first sequence is still computing it, or a preempted request
                # whose last token is still being sampled.
                index += 1
                continue
            if self._lacks_lora_slot(request, running_loras):
                index += 1  # every adapter slot is taken by running requests of other adapters: let others pass
                continue
            grammar = request.structured_output
            if grammar is not None and not grammar.is_ready():
                index += 1  # its grammar is still compiling: let the others pass
                continue
            if grammar is not None and grammar.error is not None:
                self.waiting.pop(index)
                self._finish_unscheduled(request, RequestStatus.FINISHED_ABORTED, grammar.error)
                continue
            num_new = self._admit(request, budget.tokens_left, output)
            if num_new is None:
                break
            self.waiting.pop(index)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            bisect.insort(self.running, request, key=self._key)
            if request.lora_int_id:
                running_loras.add(request.lora_int_id)
            output.new_reqs.append(self._new_request_data(request))
            output.num_scheduled_tokens[request.request_id] = num_new
            budget.tokens_left -= num_new

    def _running_loras(self) -> set[int]:
        """The adapters of the running requests (empty without LoRA)."""
        if not self.config.max_loras:
            return set()
        return {request.lora_int_id for request in self.running if request.lora_int_id}

    def _lacks_lora_slot(self, request: Request, running_loras: set[int]) -> bool:
        """Whether admitting the request would put more distinct adapters in the running batch (so in a step) than
        the device has slots for."""
        lora_id = request.lora_int_id
        return bool(lora_id) and lora_id not in running_loras and len(running_loras) >= self.config.max_loras

    def _admit(self, request: Request, tokens_left: int, output: SchedulerOutput) -> int | None:
        """Give a waiting request its KV blocks and computed tokens; return how many tokens it computes this step,
        or None (nothing changed) when it does not fit."""
        kv = self.kv_cache_manager
        if request.status == RequestStatus.SWAPPED:
            num_new = min(request.num_tokens - request.num_computed_tokens, tokens_left)
            return num_new if self._swap_in(request, num_new, output) else None
        source = self._fork_source(request)
        if source is not None:
            # Share the source's prompt blocks; compute only the last prompt token, to sample from.
            kv.fork(source, request, request.num_prompt_tokens - 1)
            request.num_computed_tokens = request.num_prompt_tokens - 1
            if kv.allocate_slots(request, 1) is None:
                kv.free(request)
                request.num_computed_tokens = 0
                return None
            return 1
        cached_blocks, num_cached = kv.get_computed_blocks(request)
        num_new = request.num_tokens - num_cached
        if not self.config.enable_chunked_prefill and num_new > tokens_left:
            return None
        num_new = min(num_new, tokens_left)
        if kv.allocate_slots(request, num_new, cached_blocks) is None:
            return None
        if kv.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_cached
        request.num_computed_tokens = num_cached
        return num_new

    def _fork_source(self, request: Request) -> Request | None:
        """The running sequence this fresh one can start from, if it has computed the prompt but its last token."""
        if not _is_fresh_fork(request):
            return None
        source = self.requests.get(request.fork_source)
        if source is None or source.status != RequestStatus.RUNNING:
            return None
        return source if source.num_computed_tokens >= request.num_prompt_tokens - 1 else None

    def _waits_for_fork_source(self, request: Request) -> bool:
        """Hold a fresh sequence while its source is queued or still computing the prompt: forking later shares
        the prompt's blocks instead of computing them again."""
        if not _is_fresh_fork(request):
            return False
        source = self.requests.get(request.fork_source)
        if source is None or source.status in (RequestStatus.PREEMPTED, RequestStatus.SWAPPED):
            return False
        return self._fork_source(request) is None

    def _new_request_data(self, request: Request) -> NewRequestData:
        self._runner_knows.add(request.request_id)
        self.kv_cache_manager.take_rewritten_table(request.request_id)  # the table below is whole anyway
        return NewRequestData(
            req_id=request.request_id,
            token_ids=request.all_token_ids,
            num_prompt_tokens=request.num_prompt_tokens,
            sampling_params=request.sampling_params,
            sampling_seed=request.sampling_seed,
            block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
            num_computed_tokens=request.num_computed_tokens,
            structured_output=request.structured_output,
            lora_request=request.lora_request,
            pooling_params=request.pooling_params,
        )

    def _swap_in(self, request: Request, num_new: int, output: SchedulerOutput) -> bool:
        """Bring a swapped request's blocks back and make room for its next tokens, if the pool allows."""
        kv = self.kv_cache_manager
        num_blocks = -(-(request.num_computed_tokens + num_new) // kv.block_size)
        if num_blocks > kv.num_free_blocks:
            return False
        output.blocks_to_swap_in += kv.swap_in(request)
        kv.allocate_slots(request, num_new)
        return True

    def _should_swap(self, request: Request) -> bool:
        mode = self.config.preemption_mode
        if request.is_pooling:
            return False  # a prompt-only request recomputes cheaply, and the runner's partial pooling state is gone
        if mode == "recompute" or not self.kv_cache_manager.can_swap_out(request):
            return False
        return mode == "swap" or request.num_computed_tokens >= SWAP_MIN_TOKENS

    def _preempt(self, request: Request) -> None:
        """Free a running request's device blocks: swapped to the CPU pool, or dropped to be recomputed."""
        self.running.remove(request)
        if self._should_swap(request):
            mapping = self.kv_cache_manager.swap_out(request)
            self._swap_out += mapping
            self.num_swapped_out_blocks_total += len(mapping)
            self.num_swap_preemptions_total += 1
            request.status = RequestStatus.SWAPPED
        else:
            self._drop_kv(request)
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._requeue(request)

    def _drop_kv(self, request: Request) -> None:
        """Free the request's KV (device and swapped): it recomputes everything when it runs again."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0

    def _requeue(self, request: Request) -> None:
        self._forget_in_runner(request.request_id)
        bisect.insort(self.waiting, request, key=self._key)

    # ---- a step that raised --------------------------------------------------------------------------------

    def recover_from_failed_step(self, scheduler_output: SchedulerOutput, error: str) -> list[EngineCoreOutput]:
        """The step of ``scheduler_output`` raised ``error``: requeue what it ran for recompute, trusting none of the
        KV it may have written, and fail the requests the quarantine blames. Returns the outputs to hand out."""
        suspects = self._requeue_step(scheduler_output)
        verdict = self._quarantine.record_failure([request.request_id for request in suspects], error)
        for request_id in verdict.culprits:
            self._fail(request_id, f"The engine could not run this request: {error}")
        for request_id in verdict.given_up:
            self._fail(request_id, "The engine failed repeatedly while running this request (engine fault)")
        return self.take_pending_outputs()

    def discard_step(self, scheduler_output: SchedulerOutput) -> list[EngineCoreOutput]:
        """Give up the output of a step that ran on the tokens of a step that failed: requeue its requests for
        recompute, as for a failed step, but blame none of them."""
        self._requeue_step(scheduler_output)
        return self.take_pending_outputs()

    def _requeue_step(self, scheduler_output: SchedulerOutput) -> list[Request]:
        """Requeue the requests a step ran that are still running, for recompute (trusting none of the KV the step
        may have written); return them."""
        # The runner may have raised before dropping these: tell it again.
        self._finished_since_last_step |= scheduler_output.finished_req_ids
        scheduled = [request for request_id, request in self._unfinished_steps.pop(scheduler_output.step_id, {}).items()
                     if self.requests.get(request_id) is request]
        requeued = [request for request in scheduled if request.status == RequestStatus.RUNNING]
        self._distrust_step_kv(scheduler_output, requeued)
        for request in scheduled:
            request.num_output_placeholders = 0  # the step's samples never arrive
            if request.status == RequestStatus.SWAPPED:
                self._drop_kv(request)  # preempted after the step was launched: its swapped KV holds the step's
        for request in requeued:
            self.running.remove(request)
            self._drop_kv(request)
            self._requeue(request)
        return requeued

    def _distrust_step_kv(self, scheduler_output: SchedulerOutput, suspects: list[Request]) -> None:
        """Make sure no block the failed step may have written (its tokens, swap-in and copy targets) stays in the
        prefix cache, and that no swap-out it may not have copied is swapped back in."""
        kv = self.kv_cache_manager
        computed_before = {data.req_id: data.num_computed_tokens
                           for data in [*scheduler_output.new_reqs, *scheduler_output.cached_reqs]}
        for request in suspects:
            kv.forget_hashes_from(request, computed_before[request.request_id])
        kv.forget_block_hashes([block for _, block in scheduler_output.blocks_to_swap_in + scheduler_output.blocks_to_copy])
        if scheduler_output.blocks_to_swap_out:
            cpu_targets = {cpu_block for _, cpu_block in scheduler_output.blocks_to_swap_out}
            for request in self.waiting:
                if request.status == RequestStatus.SWAPPED and cpu_targets.intersection(kv.cpu_block_ids(request)):
                    self._drop_kv(request)

    def _fail(self, request_id: str, error: str) -> None:
        """Finish a request the engine cannot run, with an output that says why."""
        self.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        self._pending_outputs.append(EngineCoreOutput(request_id, [], finish_reason="abort", error=error))

    # ---- results of a step ---------------------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens (in place of their placeholders), finish requests that hit a stop condition."""
        outputs = self.take_pending_outputs()
        for request_id, request in self._unfinished_steps.pop(scheduler_output.step_id, {}).items():
            if self.requests.get(request_id) is not request:
                continue  # finished (aborted, or stopped by a step in flight before) while the step ran
            new_token_ids = []
            was_running = request.status == RequestStatus.RUNNING
            if request.is_pooling:
                outputs += self._finish_pooled(request, runner_output.pooled_outputs.get(request_id))
                continue
            token_id = runner_output.sampled_token_ids.get(request_id)
            if token_id is not None:
                request.num_output_placeholders -= 1
                request.output_token_ids.append(token_id)
                new_token_ids.append(token_id)
                self._check_stop(request, request_id in runner_output.grammars_terminated)
            prompt_logprobs = runner_output.prompt_logprobs.get(request_id)
            if new_token_ids or prompt_logprobs:
                outputs.append(
                    EngineCoreOutput(
                        request_id,
                        new_token_ids,
                        new_logprobs=runner_output.logprobs.get(request_id),
                        new_prompt_logprobs=prompt_logprobs,
                        finish_reason=request.status.finish_reason,
                        stop_reason=request.stop_reason,
                        num_preemptions=request.num_preemptions,
                    )
                )
            if request.is_finished:
                (self.running if was_running else self.waiting).remove(request)
                self._release(request)
        if self._quarantine.is_engaged and not scheduler_output.is_empty:
            self._report_success(scheduler_output, runner_output)
        return outputs

    def _finish_pooled(self, request: Request, pooled: list[float] | None) -> list[EngineCoreOutput]:
        """An embedding request's prompt is computed: it finishes with its vector and its blocks are freed now
        (no KV is kept for it beyond what the prefix cache may reuse). A chunk before the last has no output."""
        if pooled is None:
            return []
        request.status = RequestStatus.FINISHED_STOPPED
        self.running.remove(request)
        self._release(request)
        return [EngineCoreOutput(request.request_id, [], finish_reason="stop", num_preemptions=request.num_preemptions,
                                 pooled_output=pooled)]

    def _report_success(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        """Tell the quarantine which scheduled requests caught up (sampled, or finished) in a step that worked."""
        sampled = runner_output.sampled_token_ids
        self._quarantine.record_success(
            request_id
            for request_id in scheduler_output.num_scheduled_tokens
            if request_id in sampled or request_id not in self.requests
        )

    def _check_stop(self, request: Request, grammar_terminated: bool) -> None:
        params = request.sampling_params
        last_token = request.output_token_ids[-1]
        if grammar_terminated:
            request.status = RequestStatus.FINISHED_STOPPED  # the grammar is complete
            return
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last_token in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            if last_token in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = last_token
                return
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    def _finish_unscheduled(self, request: Request, status: RequestStatus, reason: str) -> None:
        """Finish a waiting request that will never run; its output goes out with the next step's outputs."""
        request.stop_reason = reason
        self._finish(request, status)
        self._pending_outputs.append(
            EngineCoreOutput(request.request_id, [], finish_reason=status.finish_reason, stop_reason=reason)
        )

    def take_pending_outputs(self) -> list[EngineCoreOutput]:
        """Outputs of requests finished while scheduling (e.g. a grammar that failed to compile)."""
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._release(request)

    def _release(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self._forget_in_runner(request.request_id)
        del self.requests[request.request_id]

    def _forget_in_runner(self, request_id: str) -> None:
        if request_id in self._runner_knows:
            self._runner_knows.discard(request_id)
            self._finished_since_last_step.add(request_id)


@dataclass(slots=True)
class _Budget:
    tokens_left: int


def _lora_names(requests: list[Request]) -> list[str]:
    """The distinct adapter names of ``requests``, sorted."""
    return sorted({request.lora_request.lora_name for request in requests if request.lora_request is not None})


def _is_fresh_fork(request: Request) -> bool:
    """A later sequence of a prompt that has computed nothing yet: it may still start from its source's blocks."""
    return request.fork_source is not None and not request.num_computed_tokens and not request.output_token_ids


def _arrival(request: Request) -> int:
    return request.arrival_seq


def _priority_then_arrival(request: Request) -> tuple[int, int]:
    return request.priority, request.arrival_seq
