"""The engine: EngineCore runs schedule -> execute -> update; LLMEngine wraps it with input and output processing.

EngineCore takes plain-data requests (``contracts.EngineCoreRequest``) and builds its own ``Request`` objects and
grammars from them, so it can run in its own process (``core_proc.py``) behind the same narrow interface
(add_requests / abort_requests / step_outputs).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.interface import EngineCoreOutput, SchedulerOutput
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.contracts import EngineCoreOutputs, EngineCoreRequest
from pagedllm.engine.metrics import EngineMetrics, Metric
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.processing import (
    InputProcessor,
    ProcessedRequest,
    PromptInput,
    load_tokenizer,
    resolve_eos_token_ids,
)
from pagedllm.lora.request import LoRARequest
from pagedllm.params import RequestOutput, SamplingParams
from pagedllm.worker.executor import Executor, make_executor
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.step_output import StepOutput

logger = logging.getLogger(__name__)

_IDLE_STEP_SLEEP_S = 0.001


class EngineCore:
    """The scheduler and the executor (which drives the workers), stepping together."""

    # What a front end may call through ``UtilityCall`` (no argument is a live object).
    UTILITY_METHODS = frozenset({"num_unfinished_requests", "get_startup_report"})

    def __init__(self, config: EngineConfig, structured_output_manager: Callable[[], Any] | None = None) -> None:
        """``structured_output_manager``: returns the grammar manager to use (in-process: the front end's, so a
        spec compiles once); None: the core makes its own, with its own tokenizer, on the first constrained request."""
        start = time.perf_counter()
        self.config = config
        self._manager_provider = structured_output_manager
        self._own_manager = None  # made here when no provider was given
        self._own_manager_lock = threading.Lock()  # the loop and the warm-up thread may both make it
        # Requests whose first schedule time the front end has not been told yet (its queue-time metric).
        self._awaiting_first_output: dict[str, Request] = {}
        # Unloaded adapters (ids are never reused: a reload gets a new one) and those of them the workers still hold
        # because a request runs with them; dropped after the step in which their last request ends.
        self._unloaded_lora_ids: set[int] = set()
        self._loras_to_remove: set[int] = set()
        # The launched steps whose outputs the scheduler has not had (oldest first), at most max_steps_in_flight.
        self._in_flight: deque[_LaunchedStep] = deque()
        self.max_steps_in_flight = max_steps_in_flight(config)
        self.executor: Executor = make_executor(config)
        num_blocks = self.executor.determine_num_blocks()
        self._check_capacity(num_blocks)
        self.executor.initialize_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        self.num_cpu_blocks = self.executor.num_cpu_blocks()  # the swap space's
        kv_cache_manager = KVCacheManager(
            num_blocks,
            config.cache_config.block_size,
            config.cache_config.enable_prefix_caching,
            num_cpu_blocks=self.num_cpu_blocks,
        )
        self.scheduler = Scheduler(config.scheduler_config, kv_cache_manager,
                                   config.parallel_config.pipeline_parallel_size)
        self.startup_report = self._startup_report(time.perf_counter() - start)
        logger.info("Engine ready: %s", self.startup_report)

    def _startup_report(self, total_s: float) -> dict:
        """What start-up decided and what it cost: KV blocks, concurrency at full length, seconds per phase."""
        block_size = self.config.cache_config.block_size
        max_model_len = self.config.scheduler_config.max_model_len
        worker_info = self.executor.startup_info()
        parallel = self.config.parallel_config
        return {
            # tp x pp ranks; every rank holds num_gpu_blocks blocks (of its own KV heads and layers): the smallest
            # budget over the ranks
            "parallel_layout": f"tp{parallel.tensor_parallel_size} x pp{parallel.pipeline_parallel_size}",
            "distributed_executor_backend": parallel.distributed_executor_backend,
            "num_gpu_blocks": self.num_blocks,
            "num_cpu_blocks": self.num_cpu_blocks,
            "kv_cache_dtype": self.config.kv_cache_dtype,
            "kv_cache_tokens": self.num_blocks * block_size,
            "quantization": self.config.model_config.quantization,
            "weight_bytes": worker_info["weight_bytes"],
            "weight_gib": round(worker_info["weight_bytes"] / 2**30, 3),
            "max_concurrency_at_max_model_len": round(self.num_blocks * block_size / max_model_len, 2),
            "attention_backend": self.config.attention_backend,
            "cuda_graphs": worker_info["cuda_graphs"],
            "seconds": {**{name: round(s, 3) for name, s in worker_info["seconds"].items()}, "total": round(total_s, 3)},
        }

    @property
    def model_runner(self) -> ModelRunner:
        """The driver worker's runner, for tests and benchmarks that look inside (in-process executor only)."""
        return self.executor.driver_worker.model_runner

    def _check_capacity(self, num_blocks: int) -> None:
        capacity = num_blocks * self.config.cache_config.block_size
        max_model_len = self.config.scheduler_config.max_model_len
        if capacity < max_model_len:
            raise ValueError(
                f"The KV cache holds {capacity} tokens ({num_blocks} blocks), fewer than max_model_len="
                f"{max_model_len}: a request of full length could never run. Lower max_model_len or raise "
                "kv_cache_memory_bytes / num_gpu_blocks_override / gpu_memory_utilization."
            )

    # ---- requests in: plain data -> Request (with its grammar) ------------------------------------------------

    def add_requests(self, core_requests: list[EngineCoreRequest]) -> None:
        """Queue the sequences of one request; ValueError (and nothing queued) on an id in use or a bad spec."""
        in_use = [r.request_id for r in core_requests if r.request_id in self.scheduler.requests]
        if in_use:
            raise ValueError(f"Request id {in_use[0]!r} is already in use")
        grammars = self._grammars(core_requests)
        for core_request, grammar in zip(core_requests, grammars):
            self.add_request(self._make_request(core_request, grammar))
            lora = core_request.lora_request
            if lora is not None and lora.lora_int_id in self._unloaded_lora_ids:
                # Admitted before the unload but arrived after it: it runs (and loads the adapter again), then the
                # adapter goes once more.
                self._loras_to_remove.add(lora.lora_int_id)

    def _make_request(self, core_request: EngineCoreRequest, grammar: object | None) -> Request:
        return Request(
            request_id=core_request.request_id,
            prompt_token_ids=core_request.prompt_token_ids,
            sampling_params=core_request.sampling_params,
            sampling_seed=core_request.sampling_seed,
            eos_token_ids=self.config.model_config.eos_token_ids,
            max_tokens=core_request.max_tokens,
            arrival_time=core_request.arrival_time,
            priority=core_request.priority,
            fork_source=core_request.fork_source,
            structured_output=grammar,
            lora_request=core_request.lora_request,
            pooling_params=core_request.pooling_params,
        )

    def _grammars(self, core_requests: list[EngineCoreRequest]) -> list[object | None]:
        """One grammar object per constrained sequence (sequences of one spec share one compile)."""
        specs = [r.sampling_params.structured_outputs for r in core_requests]
        grammars: list[object | None] = [None] * len(specs)
        by_key: dict[tuple[str, str], list[int]] = {}
        for index, spec in enumerate(specs):
            if spec is not None:
                by_key.setdefault((spec.kind, spec.spec_key), []).append(index)
        for indices in by_key.values():
            made = self.structured_output_manager.new_requests(specs[indices[0]], len(indices))
            for index, grammar in zip(indices, made):
                grammars[index] = grammar
        return grammars

    @property
    def structured_output_manager(self):
        """The grammar compiler and cache the core's grammars come from (made on first use)."""
        if self._manager_provider is not None:
            return self._manager_provider()
        with self._own_manager_lock:
            if self._own_manager is None:
                self._own_manager = make_structured_output_manager(self.config)
            return self._own_manager

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)
        self._awaiting_first_output[request.request_id] = request

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(request_ids, status)
        for request_id in request_ids:
            self._awaiting_first_output.pop(request_id, None)
        if self._loras_to_remove:  # an idle core may not step again soon
            self._remove_unused_loras()

    # ---- adapters ----------------------------------------------------------------------------------------------

    def remove_lora(self, lora_int_id: int) -> None:
        """An adapter was unloaded: the workers drop its weights (GPU slot, CPU cache) as soon as no request of this
        core runs with it (now, or after the step in which the last one ends)."""
        self._unloaded_lora_ids.add(lora_int_id)
        self._loras_to_remove.add(lora_int_id)
        self._remove_unused_loras()

    def _remove_unused_loras(self) -> None:
        in_use = {request.lora_int_id for request in self.scheduler.requests.values()}
        for lora_int_id in self._loras_to_remove - in_use:
            self.executor.collective_rpc("remove_lora", lora_int_id)
            logger.info("LoRA adapter %d (unloaded) removed from the workers", lora_int_id)
        self._loras_to_remove &= in_use

    # ---- outputs: one step as a plain-data message ---------------------------------------------------------

    def step_outputs(self) -> EngineCoreOutputs:
        """``step()`` with what the front end needs besides the outputs: scheduler stats, fault, timestamps."""
        outputs = self.step()
        if self._loras_to_remove:
            self._remove_unused_loras()
        return EngineCoreOutputs(outputs, time.monotonic(), self.scheduler.stats(), self.engine_fault,
                                 self._first_scheduled_times(outputs))

    def _first_scheduled_times(self, outputs: list[EngineCoreOutput]) -> dict[str, float]:
        """When each request with its first output this step was first scheduled (the front end's queue time)."""
        times = {}
        for output in outputs:
            request = self._awaiting_first_output.pop(output.request_id, None)
            if request is not None and request.first_scheduled_time is not None:
                times[output.request_id] = request.first_scheduled_time
        return times

    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished_requests

    def get_startup_report(self) -> dict:
        return self.startup_report

    def shutdown(self) -> None:
        """Stop what the core started: its grammar compile workers and the executor's workers."""
        with self._own_manager_lock:
            manager = self._own_manager
        if manager is not None:
            manager.shutdown()
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """Launch a step while fewer than ``max_steps_in_flight`` are, and hand out the outputs of the oldest one once
        that many are (or nothing new could be launched): synchronously (1), this step's outputs; with async
        scheduling (2), the step before's, the host planning this one while the device runs that; under pipeline
        parallelism (pp), one step per stage. While the quarantine looks for a failing request, steps run one at a
        time."""
        depth = 1 if self.scheduler.is_isolating_failure else self.max_steps_in_flight
        if len(self._in_flight) < depth:
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.has_work:
                return self._launch(scheduler_output, depth)
        if self._in_flight:
            return self._finish_in_flight()
        return self._idle()

    def _launch(self, scheduler_output: SchedulerOutput, depth: int) -> list[EngineCoreOutput]:
        """Hand the step to the executor; then wait for the oldest step only when ``depth`` are in flight."""
        try:
            launched = _LaunchedStep(scheduler_output, self.executor.execute_model_async(scheduler_output))
        except Exception as exc:
            # Recover now (after the steps before it): the next schedule must not count on this step.
            self._in_flight.append(_LaunchedStep(scheduler_output, None, exc))
            return self._finish_all_in_flight()
        self._in_flight.append(launched)
        return self._finish_in_flight() if len(self._in_flight) >= depth else []

    def _idle(self) -> list[EngineCoreOutput]:
        if self.scheduler.has_unfinished_requests():
            # Everything left waits for a grammar to compile: let the compiling threads have the GIL rather than
            # spin on empty steps.
            time.sleep(_IDLE_STEP_SLEEP_S)
        return self.scheduler.take_pending_outputs()

    def _finish_in_flight(self) -> list[EngineCoreOutput]:
        """Read the oldest launched step's output (waiting for the device) and update the scheduler with it. When it
        failed, the steps launched after it are given up too (they ran on its tokens or on the KV it was to write)."""
        launched = self._in_flight.popleft()
        try:
            if launched.error is not None:
                raise launched.error
            runner_output = launched.output.result()
        except Exception as exc:
            outputs = self._recover(launched.scheduler_output, exc)
            while self._in_flight:
                outputs += self._discard(self._in_flight.popleft())
            return outputs
        return self.scheduler.update_from_output(launched.scheduler_output, runner_output)

    def _finish_all_in_flight(self) -> list[EngineCoreOutput]:
        outputs = []
        while self._in_flight:
            outputs += self._finish_in_flight()
        return outputs

    def _discard(self, launched: _LaunchedStep) -> list[EngineCoreOutput]:
        if launched.output is not None:
            try:
                launched.output.result()
            except Exception:
                logger.debug("A step launched after a failed one failed too", exc_info=True)
        return self.scheduler.discard_step(launched.scheduler_output)

    def _recover(self, scheduler_output: SchedulerOutput, exc: Exception) -> list[EngineCoreOutput]:
        """One request's bad state must not fail the batch: the scheduler requeues the step's requests and retries
        them in groups until the culprit runs (and fails) alone."""
        if self.executor.failure is not None:  # a worker died: no step can run, every request fails now
            return self._fail_all_requests(self.executor.failure)
        logger.warning("Engine step failed; requests in it: %s", list(scheduler_output.num_scheduled_tokens),
                       exc_info=exc)
        return self.scheduler.recover_from_failed_step(scheduler_output, describe_error(exc))

    def _fail_all_requests(self, reason: str) -> list[EngineCoreOutput]:
        """End every request with the error (the executor cannot run steps any more)."""
        self._in_flight.clear()
        request_ids = list(self.scheduler.requests)
        self.abort_requests(request_ids)
        message = f"The engine's workers failed: {reason}"
        return [EngineCoreOutput(request_id, [], finish_reason="abort", error=message) for request_id in request_ids]

    @property
    def engine_fault(self) -> str | None:
        """Why steps keep failing with no request to blame, or why the workers cannot run any (a dead worker);
        None while healthy (see ``core/quarantine.py``)."""
        if self.executor.failure is not None:
            return f"a worker process died: {self.executor.failure}"
        return self.scheduler.engine_fault


@dataclasses.dataclass(slots=True)
class _LaunchedStep:
    """A step handed to the executor: its output to read, or the error its launch raised."""

    scheduler_output: SchedulerOutput
    output: StepOutput | None
    error: Exception | None = None


def max_steps_in_flight(config: EngineConfig) -> int:
    """How many launched steps the engine keeps unanswered. Under pipeline parallelism one per stage: each stage works
    on its own step (disjoint requests: see core/scheduler.py) instead of waiting for the whole pipeline, which
    would leave each of the pp stages idle (pp - 1) / pp of the time. Otherwise two with async scheduling, else one."""
    num_stages = config.parallel_config.pipeline_parallel_size
    if num_stages > 1:
        return num_stages
    return 2 if config.scheduler_config.async_scheduling else 1


_MAX_ERROR_CHARS = 300  # what of an exception's text a client may see


def describe_error(exc: BaseException, max_chars: int = _MAX_ERROR_CHARS) -> str:
    """An exception as a short line for the client of the request that raised it (type and bounded message)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def make_structured_output_manager(config: EngineConfig):
    """A grammar manager of the core's own (the core process's): with the tokenizer, which xgrammar's tables need."""
    from pagedllm.structured_output import StructuredOutputManager

    if config.skip_tokenizer_init:
        raise ValueError("structured_outputs needs a tokenizer; this engine was built with skip_tokenizer_init=True")
    return StructuredOutputManager.for_engine(load_tokenizer(config.model_config), config)


def start_grammar_warm_up(manager_provider: Callable[[], Any]) -> None:
    """Build the grammar manager and its compile pool in a background thread (a failure is only logged: the first
    constrained request then meets it)."""
    def warm_up() -> None:
        try:
            manager_provider().start_workers()
        except Exception:
            logger.warning("Starting the grammar compile workers ahead failed", exc_info=True)

    threading.Thread(target=warm_up, name="pagedllm-grammar-warm-up", daemon=True).start()


def with_resolved_eos_token_ids(config: EngineConfig, tokenizer) -> EngineConfig:
    """``config`` whose ``model_config.eos_token_ids`` is the whole end-of-sequence set (``resolve_eos_token_ids``)."""
    eos_token_ids = resolve_eos_token_ids(config.model_config, tokenizer)
    return dataclasses.replace(config, model_config=dataclasses.replace(config.model_config, eos_token_ids=eos_token_ids))


class LLMEngine:
    """Synchronous engine: text or token-id prompts in, RequestOutputs out, one ``step()`` at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model_config)
        config = with_resolved_eos_token_ids(config, self.tokenizer)
        self.config = config
        self.input_processor = InputProcessor(config, self.tokenizer)
        # In-process, the core's grammars come from the front end's manager: a spec checked early compiles once.
        self.engine_core = EngineCore(config, lambda: self.input_processor.structured_output_manager)
        self.metrics = EngineMetrics.for_engine(config, self.engine_core.startup_report)
        self.output_processor = OutputProcessor(self.tokenizer, self.metrics)

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validate and queue a request; raises ValueError (and queues nothing) on bad input."""
        self.add_processed(self.process_request(request_id, prompt, params, arrival_time, priority, lora_request))

    def process_request(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> ProcessedRequest:
        """Tokenize and validate without queueing, so a batch can be checked whole before any of it runs."""
        if self.output_processor.has_request(request_id):
            raise ValueError(f"Request id {request_id!r} is already in use")
        processed = self.input_processor.process(request_id, prompt, params, arrival_time, priority, lora_request)
        self.input_processor.check_structured_outputs(params)  # a bad spec raises now, before a batch is queued
        return processed

    def add_processed(self, processed: ProcessedRequest) -> None:
        self.engine_core.add_requests(processed.requests)
        self.output_processor.add_request(processed)

    def abort_request(self, request_ids: str | list[str]) -> None:
        request_ids = [request_ids] if isinstance(request_ids, str) else request_ids
        child_ids = self.output_processor.abort_requests(request_ids)
        self.engine_core.abort_requests(child_ids)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def remove_lora(self, lora_int_id: int) -> None:
        """Drop an unloaded adapter's weights once no request runs with it (``EngineCore.remove_lora``)."""
        self.engine_core.remove_lora(lora_int_id)

    @property
    def engine_fault(self) -> str | None:
        return self.engine_core.engine_fault

    def get_num_unfinished_requests(self) -> int:
        return self.engine_core.scheduler.num_unfinished_requests

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the outputs of requests that made progress."""
        core_outputs = self.engine_core.step_outputs()
        processed = self.output_processor.process_outputs(core_outputs.outputs, core_outputs.first_scheduled_times)
        if processed.stopped_by_string:
            self.engine_core.abort_requests(processed.stopped_by_string, RequestStatus.FINISHED_STOPPED)
        if processed.failed:
            self.engine_core.abort_requests(processed.failed)
        self.metrics.record_step(core_outputs.scheduler_stats)
        return processed.request_outputs

    def get_metrics(self) -> list[Metric]:
        self.metrics.record_step(self.engine_core.scheduler.stats())
        return self.metrics.snapshot()

    @property
    def structured_output_manager(self):
        """The grammar compiler and cache (shared by the front end and the core); ValueError without a tokenizer."""
        return self.input_processor.structured_output_manager

    def warm_up_structured_outputs(self) -> None:
        """Serving: start the grammar compile workers now, in the background, so that the first constrained request
        does not wait ~5-10 s for them. Does not delay anything; nothing to do without a tokenizer."""
        if self.tokenizer is not None:
            start_grammar_warm_up(lambda: self.input_processor.structured_output_manager)

    def shutdown(self) -> None:
        """Kill the grammar compile workers (pending compiles fail at once) and stop the core."""
        self.input_processor.shutdown_structured_outputs()
        self.engine_core.shutdown()
