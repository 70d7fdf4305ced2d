"""The edges of the engine: prompts in (tokenize, validate) and outputs out (detokenize, stop strings, assembly).

A request with ``n > 1`` fans out into n core requests (``"{index}_{request_id}"``), one per sequence; their
outputs are gathered back into one RequestOutput.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.core.interface import TopLogprobs
from pagedllm.core.request import Request
from pagedllm.core.scheduler import EngineCoreOutput
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.metrics import EngineMetrics
from pagedllm.params import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SamplingParams

PromptInput = Union[str, dict[str, Any]]  # "text", {"prompt": "text"} or {"prompt_token_ids": [...]}


def load_tokenizer(model_config: ModelConfig):
    """The Hugging Face tokenizer of the model (fast when available)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_config.tokenizer)
    except Exception as exc:
        raise ValueError(
            f"Could not load a tokenizer from {model_config.tokenizer!r} ({exc}). Pass tokenizer=..., or "
            "skip_tokenizer_init=True to use token-id prompts only."
        ) from exc


# ---- inputs ----------------------------------------------------------------------------------------------------


@dataclass
class ProcessedRequest:
    """A validated request: its prompt and the core requests (one per sequence) it fans out into."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    requests: list[Request]
    arrival_time: float


class InputProcessor:
    """Tokenizes and validates prompts and sampling parameters before anything is queued."""

    def __init__(self, config: EngineConfig, tokenizer, num_kv_blocks: int) -> None:
        self.model_config = config.model_config
        self.max_model_len = config.scheduler_config.max_model_len
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_token_ids(config.model_config, tokenizer)
        self._seed_rng = random.Random(config.seed)

    def process(
        self, request_id: str, prompt: PromptInput, params: SamplingParams, arrival_time: float | None = None
    ) -> ProcessedRequest:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        prompt_text, prompt_token_ids = self._tokenize(prompt)
        self._validate(prompt_token_ids, params)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_token_ids)
        requests = [
            Request(
                request_id=_child_id(request_id, index, params.n),
                prompt_token_ids=prompt_token_ids,
                sampling_params=_child_params(params, index),
                sampling_seed=self._sampling_seed(params, index),
                eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens,
                arrival_time=arrival_time,
            )
            for index in range(params.n)
        ]
        return ProcessedRequest(request_id, prompt_text, prompt_token_ids, params, requests, arrival_time)

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not isinstance(token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(token_ids)
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise ValueError(f"A prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {prompt!r}")
        if self.tokenizer is None:
            raise ValueError("Text prompts need a tokenizer; this engine was built with skip_tokenizer_init=True")
        return text, self.tokenizer.encode(text)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("The prompt is empty: it must contain at least one token")
        vocab_size = self.model_config.vocab_size
        out_of_range = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if out_of_range:
            raise ValueError(f"Token id {out_of_range[0]} in the prompt is out of vocabulary (vocab_size={vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"The prompt has {len(prompt_token_ids)} tokens, but this model's maximum context length "
                f"(max_model_len) is {self.max_model_len}, which must also leave room for at least one "
                "generated token. Shorten the prompt."
            )
        params.verify_for_vocab(vocab_size)
        if params.stop and (self.tokenizer is None or not params.detokenize):
            raise ValueError("stop strings need detokenization: a tokenizer and detokenize=True")

    def _sampling_seed(self, params: SamplingParams, index: int) -> int:
        """A seeded request uses its seed (+ the sequence index); others get a seed from the engine's RNG."""
        if params.seed is not None:
            return params.seed + index
        return self._seed_rng.getrandbits(63)


def _child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{index}_{request_id}"


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    if params.n == 1:
        return params
    child = params.clone()
    child.n = 1
    if index > 0:
        child.prompt_logprobs = None  # computed once, by the first sequence
    return child


def _eos_token_ids(model_config: ModelConfig, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's, the model config's and generation_config.json's."""
    ids = list(model_config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    generation_config = Path(model_config.model) / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    return tuple(dict.fromkeys(ids))


# ---- outputs ---------------------------------------------------------------------------------------------------


@dataclass
class _SequenceState:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestState:
    processed: ProcessedRequest
    sequences: dict[str, _SequenceState]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.sequences.values())


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    stopped_by_string: list[str]  # core request ids to finish: the detokenizer found a stop string


class OutputProcessor:
    """Detokenizes core outputs, applies stop strings and assembles RequestOutputs."""

    def __init__(self, tokenizer, metrics: EngineMetrics) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._requests: dict[str, _RequestState] = {}
        self._parent_of: dict[str, str] = {}  # core request id -> request id

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def add_request(self, processed: ProcessedRequest) -> None:
        sequences = {}
        for index, request in enumerate(processed.requests):
            detokenizer = IncrementalDetokenizer(self.tokenizer, processed.prompt_token_ids, request.sampling_params)
            sequences[request.request_id] = _SequenceState(
                index, detokenizer, logprobs=[] if processed.params.logprobs is not None else None,
                cumulative_logprob=0.0 if processed.params.logprobs is not None else None,
            )
            self._parent_of[request.request_id] = processed.request_id
        prompt_logprobs = [None] if processed.params.prompt_logprobs is not None else None
        self._requests[processed.request_id] = _RequestState(
            processed, sequences, prompt_logprobs, RequestMetrics(arrival_time=processed.arrival_time)
        )

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Forget requests; return the core request ids to abort."""
        child_ids = []
        for request_id in request_ids:
            state = self._requests.pop(request_id, None)
            if state is not None:
                child_ids.extend(state.sequences)
                for child_id in state.sequences:
                    del self._parent_of[child_id]
        return child_ids

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        touched: dict[str, _RequestState] = {}
        stopped_by_string = []
        now = time.monotonic()
        for output in core_outputs:
            parent_id = self._parent_of.get(output.request_id)
            if parent_id is None:
                continue
            state = self._requests[parent_id]
            sequence = state.sequences[output.request_id]
            self._record_prompt_logprobs(state, output)
            if output.new_token_ids:
                self._record_timing(state, sequence, len(output.new_token_ids), now)
            if self._update_sequence(sequence, output):
                stopped_by_string.append(output.request_id)
            touched[parent_id] = state
        request_outputs = [self._make_output(state) for state in touched.values()]
        for request_id, state in touched.items():
            if state.finished:
                state.metrics.finished_time = now
                self.abort_requests([request_id])
                self.metrics.record_finished(state)
        return ProcessedOutputs(request_outputs, stopped_by_string)

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

    def _record_timing(self, state: _RequestState, sequence: _SequenceState, num_new: int, now: float) -> None:
        metrics = state.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
            self.metrics.record_first_token(state)
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

    def _make_output(self, state: _RequestState) -> RequestOutput:
        finished = state.finished
        completions = [
            CompletionOutput(
                index=sequence.index,
                text=sequence.detokenizer.get_next_output_text(finished=sequence.finish_reason is not None, delta=False),
                token_ids=list(sequence.token_ids),
                cumulative_logprob=sequence.cumulative_logprob,
                logprobs=sequence.logprobs,
                finish_reason=sequence.finish_reason,
                stop_reason=sequence.stop_reason,
            )
            for sequence in state.sequences.values()
        ]
        processed = state.processed
        return RequestOutput(
            request_id=processed.request_id,
            prompt=processed.prompt,
            prompt_token_ids=processed.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs,
            outputs=completions,
            finished=finished,
            metrics=state.metrics,
        )
