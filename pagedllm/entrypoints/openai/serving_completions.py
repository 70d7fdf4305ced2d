"""``POST /v1/completions``: prompts (text, texts, token ids, token-id lists) in, completions out, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagedllm.entrypoints.openai.errors import OpenAIError, from_value_error
from pagedllm.entrypoints.openai.limits import LimitExceeded, check_prompt_limits, check_sampling_limits
from pagedllm.entrypoints.openai.logprobs import completion_logprobs, prompt_logprobs_json
from pagedllm.entrypoints.openai.offload import off_loop
from pagedllm.entrypoints.openai.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    make_usage,
)
from pagedllm.entrypoints.openai.serving_beam_search import (
    beam_search,
    build_beam_search_params,
    check_beam_search_request,
)
from pagedllm.entrypoints.openai.serving_common import (
    SSE_DONE,
    ServingContext,
    check_prompt_length,
    check_stream_options,
    check_structured_outputs,
    check_token_ids,
    json_response,
    merge_generations,
    client_id,
    prepare_structured_outputs,
    random_id,
    resolve_max_tokens,
    run_unless_disconnected,
    sse,
    sse_error,
    sse_plain_chunk,
    stream_failure,
)
from pagedllm.lora.request import LoRARequest
from pagedllm.params import CompletionOutput, RequestOutput, SamplingParams

_FIELDS = tuple(CompletionRequest.model_fields)


@dataclass
class _Prompt:
    """One prompt of a request, tokenized and checked."""

    token_ids: list[int]
    text: str | None  # None for token-id prompts until echo needs it

    def engine_input(self) -> dict:
        if self.text is None:
            return {"prompt_token_ids": self.token_ids}
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


class OpenAIServingCompletion:
    """Serves ``/v1/completions`` from the engine."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model_name = self.ctx.models.check(request.model)
        lora = self.ctx.models.lora_request(request.model)
        self._check_limits(request)
        _check_supported(request)
        check_stream_options(request)
        check_structured_outputs(request)
        # Tokenizing a large prompt takes milliseconds: off the loop. Checking token ids is cheaper than the hop.
        prompts = self._prompts(request) if _is_cheap_to_check(request) else await off_loop(self._prompts, request)
        request_id = random_id("cmpl")
        if request.use_beam_search:
            return await self._beam_search(request, prompts, request_id, model_name, raw_request)
        params = [self._sampling_params(request, prompt) for prompt in prompts]
        # One spec for every prompt; each client may have only a few compiles pending (429 beyond).
        await prepare_structured_outputs(self.ctx, request, params[0], client_id=client_id(raw_request))
        if request.stream:
            return StreamingResponse(self._stream(request, prompts, params, request_id, model_name),
                                     media_type="text/event-stream")
        try:
            outputs = await run_unless_disconnected(raw_request, self._generate_all(prompts, params, request_id,
                                                                                    request.priority, lora,
                                                                                    request.timeout))
        except ValueError as exc:  # bad input the engine found that the checks above let through
            raise from_value_error(exc, _FIELDS, default_param="prompt") from None
        return json_response(self._response(request, prompts, outputs, request_id, model_name))

    # ---- inputs ----------------------------------------------------------------------------------------------

    def _check_limits(self, request: CompletionRequest) -> None:
        """The server's work limits, checked before anything is tokenized."""
        try:
            check_sampling_limits(request, self.ctx.limits, "logprobs", request.logprobs)
            check_prompt_limits(_num_prompts(request.prompt), max(request.n, request.best_of or 1),
                                self.ctx.limits)
        except LimitExceeded as exc:
            raise OpenAIError(str(exc), param=exc.param) from None

    def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        """The request's prompts, tokenized and checked (on a front-end thread: see ``offload.py``)."""
        raw = request.prompt
        if isinstance(raw, str):
            prompts = [self._encode(raw, request.add_special_tokens)]
        elif not raw:
            raise OpenAIError("prompt must not be empty", param="prompt")
        elif isinstance(raw[0], int):
            prompts = [_Prompt(list(raw), None)]
        elif isinstance(raw[0], str):
            prompts = [self._encode(text, request.add_special_tokens) for text in raw]
        else:
            prompts = [_Prompt(list(ids), None) for ids in raw]
        for prompt in prompts:
            check_token_ids(prompt.token_ids, self.ctx.vocab_size, "prompt")
            check_prompt_length(len(prompt.token_ids), self.ctx.max_model_len, "prompt")
            if request.echo:  # decode an echoed token-id prompt here too, not later on the event loop
                self._prompt_text(prompt)
        return prompts

    def _encode(self, text: str, add_special_tokens: bool) -> _Prompt:
        return _Prompt(self.ctx.tokenizer.encode(text, add_special_tokens=add_special_tokens), text)

    def _max_tokens(self, request: CompletionRequest, prompt: _Prompt) -> int | None:
        """OpenAI's 16 when unset; the server's default for an explicit null; capped to the context unless given."""
        return resolve_max_tokens(request.max_tokens, "max_tokens" in request.model_fields_set, len(prompt.token_ids),
                                  self.ctx.max_model_len, default=self.ctx.generation_defaults.max_tokens)

    def _sampling_params(self, request: CompletionRequest, prompt: _Prompt) -> SamplingParams:
        max_tokens = self._max_tokens(request, prompt)
        prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:  # echoed prompt tokens come with their logprobs
            prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
        try:
            params = request.build_sampling_params(max_tokens, request.logprobs, prompt_logprobs,
                                                   self.ctx.generation_defaults)
            params.verify_for_vocab(self.ctx.vocab_size)
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS, default_param=None) from None
        return params

    def _prompt_text(self, prompt: _Prompt) -> str:
        if prompt.text is None:
            prompt.text = self.ctx.tokenizer.decode(prompt.token_ids)
        return prompt.text

    # ---- whole responses -------------------------------------------------------------------------------------

    async def _generate_all(self, prompts: list[_Prompt], params: list[SamplingParams], request_id: str,
                            priority: int, lora: LoRARequest | None,
                            timeout_s: float | None = None) -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        inputs = [prompt.engine_input() for prompt in prompts]
        async with aclosing(merge_generations(self.ctx.engine, inputs, params, request_id, priority,
                                              lora, timeout_s)) as outputs:
            async for index, output in outputs:
                finals[index] = output  # FINAL_ONLY: the one output of a finished prompt
        return finals

    def _response(self, request: CompletionRequest, prompts: list[_Prompt], outputs: dict[int, RequestOutput],
                  request_id: str, model_name: str) -> CompletionResponse:
        choices, num_generated = [], 0
        for prompt_index, prompt in enumerate(prompts):
            output = outputs[prompt_index]
            for completion in output.outputs:
                num_generated += len(completion.token_ids)
                choices.append(self._choice(request, prompt, output, completion, prompt_index))
        num_prompt = sum(len(prompt.token_ids) for prompt in prompts)
        return CompletionResponse(id=request_id, model=model_name, choices=choices,
                                  usage=make_usage(num_prompt, num_generated))

    def _choice(self, request: CompletionRequest, prompt: _Prompt, output: RequestOutput,
                completion: CompletionOutput, prompt_index: int) -> CompletionResponseChoice:
        text, token_ids, entries = completion.text, completion.token_ids, completion.logprobs
        if request.echo:
            text = self._prompt_text(prompt) + text
            if request.logprobs is not None:
                token_ids = prompt.token_ids + token_ids
                entries = (output.prompt_logprobs or [None] * len(prompt.token_ids)) + (entries or [])
        logprobs = None
        if request.logprobs is not None:
            logprobs = completion_logprobs(token_ids, entries or [], request.logprobs, self.ctx.tokenizer,
                                           as_token_ids=request.return_tokens_as_token_ids)
        return CompletionResponseChoice(
            index=prompt_index * request.n + completion.index,
            text=text,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            prompt_logprobs=prompt_logprobs_json(output.prompt_logprobs) if request.prompt_logprobs is not None
            else None,
            prompt_token_ids=prompt.token_ids if request.return_token_ids else None,
            token_ids=list(completion.token_ids) if request.return_token_ids else None,
        )

    # ---- beam search ---------------------------------------------------------------------------------------

    async def _beam_search(self, request: CompletionRequest, prompts: list[_Prompt], request_id: str,
                           model_name: str, raw_request: Request) -> Response:
        check_beam_search_request(request, wants_logprobs=request.logprobs is not None)
        params = [
            build_beam_search_params(request, self._max_tokens(request, p), len(p.token_ids), self.ctx.max_model_len)
            for p in prompts
        ]
        search = beam_search(self.ctx.engine, [p.token_ids for p in prompts], params, request_id, request.priority,
                             request.skip_special_tokens, self.ctx.models.lora_request(request.model),
                             request.timeout)
        try:
            outputs = await run_unless_disconnected(raw_request, search)
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS, default_param="prompt") from None
        choices, num_generated = [], 0
        for prompt_index, (prompt, output) in enumerate(zip(prompts, outputs)):
            for rank, sequence in enumerate(output.sequences):  # best first
                num_generated += len(sequence.token_ids)
                text = self._prompt_text(prompt) + sequence.text if request.echo else sequence.text
                choices.append(CompletionResponseChoice(
                    index=prompt_index * request.n + rank, text=text, finish_reason=sequence.finish_reason,
                    prompt_token_ids=prompt.token_ids if request.return_token_ids else None,
                    token_ids=sequence.token_ids if request.return_token_ids else None))
        num_prompt = sum(len(prompt.token_ids) for prompt in prompts)
        return json_response(CompletionResponse(id=request_id, model=model_name, choices=choices,
                                                usage=make_usage(num_prompt, num_generated)))

    # ---- streams ---------------------------------------------------------------------------------------------

    async def _stream(self, request: CompletionRequest, prompts: list[_Prompt], params: list[SamplingParams],
                      request_id: str, model_name: str) -> AsyncIterator[str | bytes]:
        """SSE chunks as the engine produces tokens. When the client goes, Starlette cancels this generator,
        which closes the engine generators: their requests are aborted."""
        created = int(time.time())
        state = _StreamState()
        inputs = [prompt.engine_input() for prompt in prompts]
        try:
            async with aclosing(merge_generations(self.ctx.engine, inputs, params, request_id,
                                                  request.priority, self.ctx.models.lora_request(request.model),
                                                  request.timeout)) as outputs:
                async for prompt_index, output in outputs:
                    choices = self._stream_choices(request, prompts[prompt_index], prompt_index, output, state)
                    if choices:
                        yield _stream_chunk(request_id, created, model_name, choices)
        except ValueError as exc:
            yield sse_error(from_value_error(exc, _FIELDS, default_param="prompt"))
        except Exception as exc:  # noqa: BLE001 - engine stopped or a step failed: say so, end the stream
            yield sse_error(stream_failure(exc, request_id))
        else:
            if request.include_usage_in_stream:
                num_prompt = sum(len(prompt.token_ids) for prompt in prompts)
                usage = make_usage(num_prompt, state.num_generated)
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=model_name, choices=[],
                                                   usage=usage))
        yield SSE_DONE

    def _stream_choices(self, request: CompletionRequest, prompt: _Prompt, prompt_index: int, output: RequestOutput,
                        state: _StreamState) -> list[CompletionResponseStreamChoice] | list[dict[str, Any]]:
        """The chunk's choices: models, or for a plain stream (no logprobs, no token ids) their JSON fields as dicts."""
        if output.prompt_logprobs is not None:  # DELTA sends them once; every sequence's echo needs them
            state.prompt_logprobs[prompt_index] = output.prompt_logprobs
        choices = []
        for completion in output.outputs:
            index = prompt_index * request.n + completion.index
            state.num_generated += len(completion.token_ids)
            text, token_ids, entries = completion.text, completion.token_ids, completion.logprobs or []
            if request.echo and index not in state.echoed:
                state.echoed.add(index)
                text = self._prompt_text(prompt) + text
                if request.logprobs is not None:
                    token_ids = prompt.token_ids + token_ids
                    entries = state.prompt_logprobs.get(prompt_index, [None] * len(prompt.token_ids)) + entries
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(token_ids, entries, request.logprobs, self.ctx.tokenizer,
                                               state.text_offsets.get(index, 0),
                                               as_token_ids=request.return_tokens_as_token_ids)
            state.text_offsets[index] = state.text_offsets.get(index, 0) + len(text)
            has_ids = request.return_token_ids and (completion.token_ids or index not in state.sent_prompt_ids)
            if not text and logprobs is None and completion.finish_reason is None and not has_ids:
                continue  # nothing to say yet (text held back until its character is complete)
            if _is_plain_stream(request):
                choices.append(_plain_choice(index, text, completion))
                continue
            choice = CompletionResponseStreamChoice(index=index, text=text, logprobs=logprobs,
                                                    finish_reason=completion.finish_reason,
                                                    stop_reason=completion.stop_reason)
            if request.return_token_ids:
                _add_token_ids(choice, prompt, completion, state)
            choices.append(choice)
        return choices


def _is_plain_stream(request: CompletionRequest) -> bool:
    """Its chunks carry text and finish state only (no logprobs, no token ids): most streams."""
    return request.logprobs is None and not request.return_token_ids


def _plain_choice(index: int, text: str, completion: CompletionOutput) -> dict[str, Any]:
    """The JSON fields of a plain stream's CompletionResponseStreamChoice (token-id fields left out when unset)."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason}


def _stream_chunk(request_id: str, created: int, model_name: str,
                  choices: list[CompletionResponseStreamChoice] | list[dict[str, Any]]) -> str | bytes:
    """One SSE chunk of a completion stream. A plain stream's chunk is serialized without building the models (same
    bytes, a tenth of the CPU: it is made once per stream and engine step)."""
    if isinstance(choices[0], dict):
        return sse_plain_chunk("text_completion", request_id, created, model_name, choices)
    return sse(CompletionStreamResponse(id=request_id, created=created, model=model_name, choices=choices))


@dataclass
class _StreamState:
    """What a stream remembers across chunks."""

    num_generated: int = 0
    echoed: set[int] = field(default_factory=set)  # choice indexes whose prompt was sent
    text_offsets: dict[int, int] = field(default_factory=dict)  # choice index -> characters sent
    prompt_logprobs: dict[int, list] = field(default_factory=dict)  # prompt index -> its prompt logprobs
    sent_prompt_ids: set[int] = field(default_factory=set)  # choice indexes whose prompt_token_ids were sent


def _add_token_ids(choice: CompletionResponseStreamChoice, prompt: _Prompt, completion: CompletionOutput,
                   state: _StreamState) -> None:
    """return_token_ids in a stream: each chunk carries the ids of its text, a choice's first also its prompt."""
    choice.token_ids = list(completion.token_ids)
    if choice.index not in state.sent_prompt_ids:
        state.sent_prompt_ids.add(choice.index)
        choice.prompt_token_ids = prompt.token_ids


# Token-id prompts up to this many ids in all are checked on the event loop (~0.3 ms at most): a hop to a front-end
# thread costs more, and under load it waits for the GIL behind the event loop and the engine loop thread.
_MAX_IDS_CHECKED_ON_LOOP = 16384


def _is_cheap_to_check(request: CompletionRequest) -> bool:
    """The prompts need no tokenizer (token ids, not echoed) and are few enough to check on the event loop."""
    prompt = request.prompt
    if request.echo or isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        return False
    num_ids = len(prompt) if not prompt or isinstance(prompt[0], int) else sum(map(len, prompt))
    return num_ids <= _MAX_IDS_CHECKED_ON_LOOP


def _num_prompts(prompt: list[int] | list[list[int]] | str | list[str]) -> int:
    """How many prompts a request's ``prompt`` holds: a string or a list of ids is one."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _check_supported(request: CompletionRequest) -> None:
    if request.suffix:
        raise OpenAIError("suffix is not supported by this server", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise OpenAIError("best_of is not supported (only best_of equal to n)", param="best_of")
