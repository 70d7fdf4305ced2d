"""Outputs out of the engine: detokenize core outputs, apply stop strings, assemble RequestOutputs.

Processing is isolated per request: a request whose outputs cannot be processed (its detokenizer or stop strings
raise), or that the engine core failed, is finished alone with finish_reason "abort" and ``RequestOutput.error``
set; the others go on.

A request with ``n > 1`` ran as n core requests; their outputs are gathered back into one RequestOutput. What each
RequestOutput carries follows the request's ``output_kind``: everything so far (CUMULATIVE), only what is new
(DELTA, for streaming; only the sequences that changed), or one output when finished (FINAL_ONLY).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pagedllm.core.interface import TopLogprobs
from pagedllm.core.interface import EngineCoreOutput
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.metrics import EngineMetrics
from pagedllm.engine.processing import ProcessedRequest
from pagedllm.params import CompletionOutput, Logprob, RequestMetrics, RequestOutput, RequestOutputKind
from pagedllm.pooling.outputs import EmbeddingOutput, EmbeddingRequestOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _SequenceState:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_tokens_sent: int = 0  # DELTA mode: how much of token_ids / logprobs earlier outputs carried

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class _RequestState:
    processed: ProcessedRequest
    sequences: dict[str, _SequenceState]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    metrics: RequestMetrics
    output_kind: RequestOutputKind  # processed.params.output_kind, read for every output
    prompt_logprobs_sent: bool = False
    embedding: list[float] | None = None  # an embedding request's vector, once pooled

    @property
    def finished(self) -> bool:
        for sequence in self.sequences.values():  # a loop, not all(...): this runs for every output
            if sequence.finish_reason is None:
                return False
        return True


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    stopped_by_string: list[str]  # core request ids to finish: the detokenizer found a stop string
    failed: list[str] = field(default_factory=list)  # core request ids to abort: their request failed


class OutputProcessor:
    """Turns core outputs into RequestOutputs; tracks each request until it finishes."""

    def __init__(self, tokenizer, metrics: EngineMetrics) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._requests: dict[str, _RequestState] = {}
        self._parent_of: dict[str, str] = {}  # core request id -> request id

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def has_first_token(self, request_id: str) -> bool:
        """True once the request's first token has arrived (or it is no longer tracked): it has left the queue."""
        state = self._requests.get(request_id)
        return state is None or state.metrics.first_token_time is not None

    def add_request(self, processed: ProcessedRequest) -> None:
        wants_logprobs = processed.params.logprobs is not None
        sequences = {}
        for index, request in enumerate(processed.requests):
            detokenizer = IncrementalDetokenizer(self.tokenizer, processed.prompt_token_ids, request.sampling_params)
            sequences[request.request_id] = _SequenceState(
                index,
                detokenizer,
                logprobs=[] if wants_logprobs else None,
                cumulative_logprob=0.0 if wants_logprobs else None,
            )
            self._parent_of[request.request_id] = processed.request_id
        prompt_logprobs = [None] if processed.params.prompt_logprobs is not None else None
        self._requests[processed.request_id] = _RequestState(
            processed, sequences, prompt_logprobs, RequestMetrics(arrival_time=processed.arrival_time),
            processed.params.output_kind,
        )

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Forget aborted requests (their unfinished sequences count as finished by "abort"); return the core
        request ids to abort."""
        child_ids = []
        for request_id in request_ids:
            state = self._forget(request_id)
            if state is not None:
                child_ids.extend(state.sequences)
                self.metrics.record_aborted(sum(not seq.finished for seq in state.sequences.values()))
        return child_ids

    def _forget(self, request_id: str) -> _RequestState | None:
        state = self._requests.pop(request_id, None)
        if state is not None:
            for child_id in state.sequences:
                del self._parent_of[child_id]
        return state

    def process_outputs(
        self, core_outputs: list[EngineCoreOutput], first_scheduled_times: dict[str, float] | None = None
    ) -> ProcessedOutputs:
        """``first_scheduled_times``: core request id -> when the core first scheduled it (sent with its first
        output: the queue-time metric)."""
        now = time.monotonic()
        num_tokens_before = self.metrics.num_tokens_total
        failed: dict[str, str] = {}  # request id -> error; filled by the engine core and by the phases below
        if first_scheduled_times:
            self._record_first_scheduled(first_scheduled_times)
        touched, stopped_by_string = self._apply_outputs(core_outputs, now, failed)
        request_outputs = self._emit_outputs(touched, now, failed)
        failed_children = []
        for request_id, error in failed.items():
            logger.warning("Request %s failed: %s", request_id, error)
            state = self._forget(request_id)
            if state is not None:
                request_outputs.append(self._failed_output(state, error, now))
                failed_children += state.sequences
        self.metrics.record_iteration(num_tokens_before)
        return ProcessedOutputs(request_outputs, stopped_by_string, failed_children)

    def _record_first_scheduled(self, first_scheduled_times: dict[str, float]) -> None:
        for child_id, scheduled_at in first_scheduled_times.items():
            parent_id = self._parent_of.get(child_id)
            if parent_id is not None:
                metrics = self._requests[parent_id].metrics
                earlier = metrics.first_scheduled_time
                metrics.first_scheduled_time = scheduled_at if earlier is None else min(earlier, scheduled_at)

    def _apply_outputs(
        self, core_outputs: list[EngineCoreOutput], now: float, failed: dict[str, str]
    ) -> tuple[dict[str, list[_SequenceState]], list[str]]:
        """Record each core output on its sequence: (sequences touched per request, core ids stopped by a string)."""
        touched: dict[str, list[_SequenceState]] = {}
        stopped_by_string = []
        for output in core_outputs:
            parent_id = self._parent_of.get(output.request_id)
            if parent_id is None or parent_id in failed:
                continue
            if output.error is not None:
                failed[parent_id] = output.error
                continue
            state = self._requests[parent_id]
            sequence = state.sequences[output.request_id]
            try:
                if self._apply(state, sequence, output, now):
                    stopped_by_string.append(output.request_id)
            except Exception as exc:
                failed[parent_id] = _processing_error(parent_id, exc)
                continue
            sequences = touched.get(parent_id)
            if sequences is None:
                touched[parent_id] = [sequence]
            else:
                sequences.append(sequence)
        return touched, stopped_by_string

    def _emit_outputs(
        self, touched: dict[str, list[_SequenceState]], now: float, failed: dict[str, str]
    ) -> list[RequestOutput]:
        request_outputs: list[RequestOutput] = []
        for request_id, sequences in touched.items():
            if request_id in failed:
                continue
            try:
                self._emit(request_id, sequences, now, request_outputs)
            except Exception as exc:
                failed[request_id] = _processing_error(request_id, exc)
        return request_outputs

    def _apply(self, state: _RequestState, sequence: _SequenceState, output: EngineCoreOutput, now: float) -> bool:
        """Record one core output of a request; return True when a stop string finished its sequence."""
        if output.new_prompt_logprobs:
            self._record_prompt_logprobs(state, output)
        if output.pooled_output is not None:
            self._record_pooled(state, output.pooled_output, now)
        if output.new_token_ids:
            self._record_timing(state, len(output.new_token_ids), now)
        return self._update_sequence(sequence, output)

    def _emit(self, request_id: str, sequences: list[_SequenceState], now: float, into: list[RequestOutput]) -> None:
        """Append the request's output of this step (if its kind sends one now); forget it once finished."""
        state = self._requests[request_id]
        finished = state.finished
        if finished or state.output_kind != RequestOutputKind.FINAL_ONLY:
            into.append(self._make_output(state, sequences, finished))
        if finished:
            state.metrics.finished_time = now
            self._forget(request_id)
            self.metrics.record_finished(state)

    def _failed_output(self, state: _RequestState, error: str, now: float) -> RequestOutput:
        """The last output of a failed request: every unfinished sequence ends with "abort"; it carries the error,
        the token ids so far (DELTA: those not sent yet) and no new text (its detokenizer may be what failed)."""
        self.metrics.record_aborted(sum(not seq.finished for seq in state.sequences.values()))
        state.metrics.finished_time = now
        delta = state.output_kind == RequestOutputKind.DELTA
        outputs = []
        for sequence in state.sequences.values():
            if not sequence.finished:
                sequence.finish_reason = "abort"
            start = sequence.num_tokens_sent if delta else 0
            outputs.append(CompletionOutput(sequence.index, "", sequence.token_ids[start:],
                                            finish_reason=sequence.finish_reason, stop_reason=sequence.stop_reason))
        processed = state.processed
        return RequestOutput(processed.request_id, processed.prompt, processed.prompt_token_ids, None, outputs,
                             finished=True, metrics=state.metrics, error=error)

    def _update_sequence(self, sequence: _SequenceState, output: EngineCoreOutput) -> bool:
        """Apply one core output to a sequence; return True when a stop string finished it."""
        sequence.token_ids.extend(output.new_token_ids)
        if output.new_logprobs is not None and sequence.logprobs is not None:
            sequence.logprobs.append(self._to_logprob_dict(output.new_logprobs))
            sequence.cumulative_logprob += output.new_logprobs.logprobs[0]
        stop_terminated = output.finish_reason == "stop"
        stop_string = sequence.detokenizer.update(output.new_token_ids, stop_terminated)
        if output.finished:
            sequence.finish_reason, sequence.stop_reason = output.finish_reason, output.stop_reason
            return False
        if stop_string is not None:
            sequence.finish_reason, sequence.stop_reason = "stop", stop_string
            return True
        return False

    def _record_prompt_logprobs(self, state: _RequestState, output: EngineCoreOutput) -> None:
        if output.new_prompt_logprobs and state.prompt_logprobs is not None:
            state.prompt_logprobs.extend(self._to_logprob_dict(entry) for entry in output.new_prompt_logprobs)

    def _record_pooled(self, state: _RequestState, embedding: list[float], now: float) -> None:
        """The vector arrives when the prompt is computed: the metrics count it as the request's first output
        (prompt tokens, time to first output, queue time); nothing is generated."""
        state.embedding = embedding
        metrics = state.metrics
        metrics.first_token_time = metrics.last_token_time = now
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = now
        self.metrics.record_first_token(state)

    def _record_timing(self, state: _RequestState, num_new: int, now: float) -> None:
        metrics = state.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
            self.metrics.record_first_token(state)
        else:
            self.metrics.record_inter_token(now - metrics.last_token_time)
        metrics.last_token_time = now
        self.metrics.generation_tokens_total += num_new

    def _to_logprob_dict(self, entry: TopLogprobs) -> dict[int, Logprob]:
        result = {}
        for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
            if token_id not in result:
                result[token_id] = Logprob(logprob, rank, self._decode_token(token_id))
        return result

    def _decode_token(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _make_output(self, state: _RequestState, touched: list[_SequenceState], finished: bool) -> RequestOutput:
        if state.processed.pooling_params is not None:
            return self._embedding_output(state)
        delta = state.output_kind == RequestOutputKind.DELTA
        sequences = touched if delta else list(state.sequences.values())
        processed = state.processed
        # Positional arguments (RequestOutput's and CompletionOutput's field order): made for every output.
        return RequestOutput(processed.request_id, processed.prompt, processed.prompt_token_ids,
                             self._prompt_logprobs_to_send(state, delta),
                             [self._completion(sequence, delta) for sequence in sequences], finished, state.metrics)

    @staticmethod
    def _embedding_output(state: _RequestState) -> EmbeddingRequestOutput:
        processed = state.processed
        return EmbeddingRequestOutput(processed.request_id, EmbeddingOutput(state.embedding or []),
                                      processed.prompt_token_ids, True, processed.prompt, metrics=state.metrics)

    @staticmethod
    def _prompt_logprobs_to_send(state: _RequestState, delta: bool) -> list[dict[int, Logprob] | None] | None:
        """DELTA sends the prompt logprobs once, with the first output that has a token (they are complete then)."""
        if not delta:
            return state.prompt_logprobs
        if state.prompt_logprobs_sent or state.metrics.first_token_time is None:
            return None
        state.prompt_logprobs_sent = True
        return state.prompt_logprobs

    @staticmethod
    def _completion(sequence: _SequenceState, delta: bool) -> CompletionOutput:
        start = sequence.num_tokens_sent if delta else 0
        sequence.num_tokens_sent = len(sequence.token_ids)
        finish_reason = sequence.finish_reason
        return CompletionOutput(
            sequence.index,
            sequence.detokenizer.get_next_output_text(finish_reason is not None, delta),
            sequence.token_ids[start:],
            sequence.cumulative_logprob,
            None if sequence.logprobs is None else sequence.logprobs[start:],
            finish_reason,
            sequence.stop_reason,
        )


def _processing_error(request_id: str, exc: Exception) -> str:
    logger.exception("Processing the output of request %s failed", request_id)
    return f"Processing this request's output failed ({type(exc).__name__})"


def merge_delta_outputs(*outputs: RequestOutput) -> RequestOutput:
    """One DELTA output carrying what consecutive ones of a request carry (texts, token ids and logprobs
    concatenated per sequence; finish state and metrics from the last one). All at once rather than pairwise: a
    stream that fell k steps behind costs one merge, not k - 1."""
    if len(outputs) == 1:
        return outputs[0]
    parts: dict[int, list[CompletionOutput]] = {}
    for output in outputs:
        for completion in output.outputs:
            parts.setdefault(completion.index, []).append(completion)
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return _replaced(outputs[-1], outputs=[_concatenated(parts[index]) for index in sorted(parts)],
                     prompt_logprobs=prompt_logprobs)


def _concatenated(parts: list[CompletionOutput]) -> CompletionOutput:
    if len(parts) == 1:
        return parts[0]
    logprobs = None
    if any(part.logprobs is not None for part in parts):
        logprobs = [entry for part in parts for entry in part.logprobs or ()]
    return _replaced(parts[-1], text="".join(part.text for part in parts),
                     token_ids=[token for part in parts for token in part.token_ids], logprobs=logprobs)


def _replaced(output: RequestOutput | CompletionOutput, **changes):
    """``dataclasses.replace`` in half the time (it re-reads the fields' definitions at every call): these
    dataclasses have no slots and only init fields. A lagging stream merges an output per step."""
    return type(output)(**{**output.__dict__, **changes})
