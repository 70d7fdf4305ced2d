"""The API server's half of an engine whose core runs in its own process.

``MultiprocessLLMEngine`` has the surface ``AsyncEngine``'s loop uses of ``LLMEngine`` (process_request,
add_processed, abort_request, step, has_unfinished_requests, get_metrics, engine_fault), but ``step()`` does no
model work: it waits for the core's ``EngineCoreOutputs`` and turns them into RequestOutputs (detokenizing,
applying stop strings: a stop string found here finishes the sequence in the core too).

No grammar is compiled here: the core owns the only compile pool, and ``structured_output_manager`` is a stand-in
(``grammar_calls.CoreGrammarPreparer``) that sends the server's early check of a spec to the core.
"""

from __future__ import annotations

import time

from pagedllm.config import EngineConfig
from pagedllm.engine.contracts import EngineCoreOutputs
from pagedllm.engine.core_client import AttachedCoreClient, CoreAttachment, EngineDeadError, MultiprocessCoreClient
from pagedllm.engine.engine import with_resolved_eos_token_ids
from pagedllm.engine.grammar_calls import CoreGrammarPreparer
from pagedllm.engine.metrics import EngineMetrics, Metric
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.processing import InputProcessor, ProcessedRequest, PromptInput, load_tokenizer
from pagedllm.lora.request import LoRARequest
from pagedllm.params import RequestOutput, SamplingParams


class MultiprocessLLMEngine:
    """Tokenize and validate here, send plain requests to the core process, process its outputs here."""

    def __init__(self, config: EngineConfig, warm_up_grammars: bool = False,
                 attachment: CoreAttachment | None = None) -> None:
        """``warm_up_grammars``: the core starts its grammar compile workers in the background once ready.
        ``attachment``: attach to a core another process started (one of several API server processes) instead
        of spawning one; its request ids are prefixed with this front end's index."""
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model_config)
        self.config = with_resolved_eos_token_ids(config, self.tokenizer)
        self.core_client = _core_client(self.config, warm_up_grammars, attachment)  # returns once the core is ready
        self.startup_report = self.core_client.ready.startup_report
        self.num_blocks = self.core_client.ready.num_blocks
        self.metrics = EngineMetrics.for_engine(self.config, self.startup_report)
        front_end = self.core_client.front_end
        self.grammar_preparer = CoreGrammarPreparer(self.config, self.core_client.send_from_any_thread, front_end)
        self.input_processor = InputProcessor(self.config, self.tokenizer, self.grammar_preparer,
                                              core_id_prefix="" if attachment is None else f"a{front_end}-")
        self.output_processor = OutputProcessor(self.tokenizer, self.metrics)
        self.engine_fault: str | None = None
        self.last_heard_from_core = time.monotonic()

    def process_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                        arrival_time: float | None = None, priority: int = 0,
                        lora_request: LoRARequest | None = None) -> ProcessedRequest:
        """Tokenize and validate. A structured-output spec is compiled by the core (the server checks it first)."""
        if self.output_processor.has_request(request_id):
            raise ValueError(f"Request id {request_id!r} is already in use")
        return self.input_processor.process(request_id, prompt, params, arrival_time, priority, lora_request)

    def add_processed(self, processed: ProcessedRequest) -> None:
        self.output_processor.add_request(processed)
        self.core_client.add_requests(processed.requests)

    def abort_request(self, request_ids: str | list[str]) -> None:
        request_ids = [request_ids] if isinstance(request_ids, str) else request_ids
        child_ids = self.output_processor.abort_requests(request_ids)
        if child_ids:
            self.core_client.abort_requests(child_ids)

    def remove_lora(self, lora_int_id: int) -> None:
        """Tell the core that an adapter was unloaded (it drops the weights once no request runs with it)."""
        self.core_client.remove_lora(lora_int_id)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.num_requests > 0

    def step(self, timeout_s: float) -> list[RequestOutput]:
        """The outputs of whatever the core has sent, waiting up to ``timeout_s`` (or a ``wake``) for some.
        Raises EngineDeadError when the core process has died."""
        request_outputs = []
        try:
            messages = self.core_client.get_outputs(timeout_s)
        except EngineDeadError as exc:
            self.grammar_preparer.abandon_all(str(exc))
            raise
        for message in messages:
            request_outputs += self._process(message)
        return request_outputs

    def _process(self, message: EngineCoreOutputs) -> list[RequestOutput]:
        self.last_heard_from_core = time.monotonic()
        self.engine_fault = message.engine_fault
        if message.grammar_results:
            self.grammar_preparer.resolve(message.grammar_results)
        if message.scheduler_stats is not None:
            self.metrics.record_step(message.scheduler_stats)
        if not message.outputs:
            return []
        processed = self.output_processor.process_outputs(message.outputs, message.first_scheduled_times)
        if processed.stopped_by_string:
            self.core_client.abort_requests(processed.stopped_by_string, stopped=True)
        if processed.failed:
            self.core_client.abort_requests(processed.failed)
        return processed.request_outputs

    def wake(self) -> None:
        self.core_client.wake()

    def get_metrics(self) -> list[Metric]:
        return self.metrics.snapshot()

    @property
    def structured_output_manager(self) -> CoreGrammarPreparer:
        """The early check of a spec, compiled by the core; ValueError without a tokenizer (as in one process)."""
        return self.input_processor.structured_output_manager

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (it kills its grammar compile workers); pending early checks fail with a 503."""
        self.grammar_preparer.shutdown()
        self.core_client.shutdown(timeout)


def _core_client(config: EngineConfig, warm_up_grammars: bool,
                 attachment: CoreAttachment | None) -> MultiprocessCoreClient | AttachedCoreClient:
    if attachment is None:
        return MultiprocessCoreClient(config, warm_up_grammars)
    return AttachedCoreClient(attachment)  # the parent started the core (and warms its grammars up)


def start_shared_core(config: EngineConfig, num_front_ends: int,
                      warm_up_grammars: bool = False) -> tuple[MultiprocessCoreClient, EngineConfig]:
    """Start a core for ``num_front_ends`` API server processes (``serve --api-server-count N``'s parent): the
    client that starts, watches and stops it, and the config as the core got it (the end-of-sequence ids resolved
    with the tokenizer, as ``MultiprocessLLMEngine`` resolves them), which every front end must use."""
    tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model_config)
    config = with_resolved_eos_token_ids(config, tokenizer)
    return MultiprocessCoreClient(config, warm_up_grammars, num_front_ends), config
