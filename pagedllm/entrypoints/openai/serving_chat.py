"""``POST /v1/chat/completions``: a conversation through the chat template in, assistant messages out, whole or
streamed (role first, then content deltas, ``finish_reason`` in each choice's last chunk)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagedllm.entrypoints.chat_utils import render_chat
from pagedllm.entrypoints.openai.chat_output import OutputFormat, finish_reason
from pagedllm.entrypoints.openai.errors import OpenAIError, from_value_error
from pagedllm.entrypoints.openai.limits import LimitExceeded, check_sampling_limits, check_tools_limit
from pagedllm.entrypoints.openai.logprobs import chat_logprobs, prompt_logprobs_json
from pagedllm.entrypoints.openai.offload import off_loop
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
    ToolCall,
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
from pagedllm.entrypoints.openai.tool_calls import ToolPlan, plan_tools
from pagedllm.lora.request import LoRARequest
from pagedllm.params import CompletionOutput, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

_FIELDS = tuple(ChatCompletionRequest.model_fields)


def render_messages(ctx: ServingContext, request: Any) -> dict[str, Any]:
    """The conversation of a chat (or chat-tokenize) request as an engine prompt; a template failure is a 400.
    It takes milliseconds on a long conversation: handlers run it with ``off_loop``."""
    conversation = [message.to_template_dict() for message in request.messages]
    try:
        return render_chat(ctx.tokenizer, conversation, ctx.chat_template, request.add_generation_prompt,
                           request.continue_final_message, request.chat_template_kwargs,
                           tools=getattr(request, "tools", None))
    except Exception as exc:  # noqa: BLE001 - the template rejected this conversation (jinja raise_exception, bad kwargs...)
        logger.info("Chat template failed on a request: %r", exc)
        raise OpenAIError(f"The messages could not be rendered with the chat template: {exc}",
                          param="messages") from None


class OpenAIServingChat:
    """Serves ``/v1/chat/completions`` from the engine."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model_name = self.ctx.models.check(request.model)
        lora = self.ctx.models.lora_request(request.model)
        self._check_limits(request)
        _check_supported(request)
        check_stream_options(request)
        check_structured_outputs(request)
        tools = _plan_tools(request, self.ctx.auto_tool_parser)
        prompt = await off_loop(render_messages, self.ctx, request)
        num_prompt_tokens = len(prompt["prompt_token_ids"])
        check_prompt_length(num_prompt_tokens, self.ctx.max_model_len, "messages")
        request_id = random_id("chatcmpl")
        if request.use_beam_search:
            return await self._beam_search(request, prompt, request_id, model_name, raw_request)
        params = self._sampling_params(request, num_prompt_tokens)
        if tools.needs_special_tokens:
            params.skip_special_tokens = False  # the format's markers are special tokens: the parser must see them
        if tools.constrained:
            params.structured_outputs = tools.structured_outputs()
            await prepare_structured_outputs(self.ctx, request, params, param="tools", client_id=client_id(raw_request))
        else:
            await prepare_structured_outputs(self.ctx, request, params, client_id=client_id(raw_request))
        fmt = OutputFormat(tools, self.ctx.reasoning_parser, prompt["prompt"], request.chat_template_kwargs,
                           constrained=params.structured_outputs is not None,
                           include_reasoning=request.include_reasoning)
        if request.stream:
            return StreamingResponse(self._stream(request, prompt, params, request_id, model_name, fmt),
                                     media_type="text/event-stream")
        try:
            output = await run_unless_disconnected(raw_request, self._generate(prompt, params, request_id,
                                                                               request.priority, lora,
                                                                               request.timeout))
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS, default_param="messages") from None
        return json_response(self._response(request, output, request_id, model_name, fmt))

    def _check_limits(self, request: ChatCompletionRequest) -> None:
        """The server's work limits, checked before the conversation is rendered."""
        try:
            check_sampling_limits(request, self.ctx.limits, "top_logprobs", request.top_logprobs)
            check_tools_limit(request.tools, self.ctx.limits)
        except LimitExceeded as exc:
            raise OpenAIError(str(exc), param=exc.param) from None

    def _max_tokens(self, request: ChatCompletionRequest, num_prompt_tokens: int) -> tuple[int | None, str]:
        """The max_tokens to run with (None: the rest of the context) and the field that set it."""
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        return resolve_max_tokens(request.requested_max_tokens, True, num_prompt_tokens, self.ctx.max_model_len,
                                  param, self.ctx.generation_defaults.max_tokens), param

    def _sampling_params(self, request: ChatCompletionRequest, num_prompt_tokens: int) -> SamplingParams:
        max_tokens, _ = self._max_tokens(request, num_prompt_tokens)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        try:
            params = request.build_sampling_params(max_tokens, logprobs, request.prompt_logprobs,
                                                   self.ctx.generation_defaults)
            params.verify_for_vocab(self.ctx.vocab_size)
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS, default_param=None) from None
        return params

    # ---- whole responses -------------------------------------------------------------------------------------

    async def _generate(self, prompt: dict[str, Any], params: SamplingParams, request_id: str,
                        priority: int, lora: LoRARequest | None, timeout_s: float | None = None) -> RequestOutput:
        final = None
        async with aclosing(merge_generations(self.ctx.engine, [prompt], [params], request_id, priority,
                                              lora, timeout_s)) as outputs:
            async for _, output in outputs:
                final = output
        return final

    def _response(self, request: ChatCompletionRequest, output: RequestOutput, request_id: str,
                  model_name: str, fmt: OutputFormat) -> ChatCompletionResponse:
        choices = []
        for completion in output.outputs:
            read = fmt.read_whole(completion.text)
            choices.append(ChatCompletionResponseChoice(
                index=completion.index,
                message=ChatResponseMessage(content=read.content, reasoning_content=read.reasoning,
                                            tool_calls=[ToolCall(**call.to_openai()) for call in read.calls] or None),
                logprobs=self._logprobs(request, completion),
                finish_reason=finish_reason(completion.finish_reason, read.calls),
                stop_reason=completion.stop_reason,
                token_ids=list(completion.token_ids) if request.return_token_ids else None,
            ))
        num_generated = sum(len(completion.token_ids) for completion in output.outputs)
        return ChatCompletionResponse(
            id=request_id, model=model_name, choices=choices,
            usage=make_usage(len(output.prompt_token_ids), num_generated),
            prompt_logprobs=prompt_logprobs_json(output.prompt_logprobs) if request.prompt_logprobs is not None
            else None,
            prompt_token_ids=list(output.prompt_token_ids) if request.return_token_ids else None,
        )

    def _logprobs(self, request: ChatCompletionRequest, completion: CompletionOutput):
        if not request.logprobs:
            return None
        return chat_logprobs(completion.token_ids, completion.logprobs or [], request.top_logprobs or 0,
                             self.ctx.tokenizer, as_token_ids=request.return_tokens_as_token_ids)

    # ---- beam search ---------------------------------------------------------------------------------------

    async def _beam_search(self, request: ChatCompletionRequest, prompt: dict[str, Any], request_id: str,
                           model_name: str, raw_request: Request) -> Response:
        check_beam_search_request(request, wants_logprobs=request.logprobs)
        num_prompt_tokens = len(prompt["prompt_token_ids"])
        max_tokens, param = self._max_tokens(request, num_prompt_tokens)
        params = build_beam_search_params(request, max_tokens, num_prompt_tokens, self.ctx.max_model_len, param)
        search = beam_search(self.ctx.engine, [prompt["prompt_token_ids"]], [params], request_id, request.priority,
                             request.skip_special_tokens, self.ctx.models.lora_request(request.model),
                             request.timeout)
        try:
            (output,) = await run_unless_disconnected(raw_request, search)
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS, default_param="messages") from None
        choices = [
            ChatCompletionResponseChoice(index=rank, message=ChatResponseMessage(content=sequence.text),
                                         finish_reason=sequence.finish_reason,
                                         token_ids=sequence.token_ids if request.return_token_ids else None)
            for rank, sequence in enumerate(output.sequences)  # best first
        ]
        num_generated = sum(len(sequence.token_ids) for sequence in output.sequences)
        prompt_token_ids = prompt["prompt_token_ids"] if request.return_token_ids else None
        return json_response(ChatCompletionResponse(id=request_id, model=model_name, choices=choices,
                                                    usage=make_usage(num_prompt_tokens, num_generated),
                                                    prompt_token_ids=prompt_token_ids))

    # ---- streams ---------------------------------------------------------------------------------------------

    async def _stream(self, request: ChatCompletionRequest, prompt: dict[str, Any], params: SamplingParams,
                      request_id: str, model_name: str, fmt: OutputFormat) -> AsyncIterator[str | bytes]:
        """SSE chunks: the assistant role for every choice first, then content as it is generated. When the client
        goes, Starlette cancels this generator, which closes the engine generator: the request is aborted.

        With tools (other than "none") or a reasoning parser, each choice's text goes through its parsers as it
        comes (see ``chat_output.ChoiceStream``): reasoning deltas, content deltas, and for each call a first delta
        with its index, id, type and name, then its arguments in fragments as they are generated; logprobs ride
        on the next chunk the choice sends."""
        created = int(time.time())

        def chunk(choices: list[ChatCompletionResponseStreamChoice], usage=None, prompt_token_ids=None) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model_name,
                                                    choices=choices, usage=usage, prompt_token_ids=prompt_token_ids))

        def plain_chunk(choices: list[dict[str, Any]]) -> bytes:  # a plain stream's, from dicts (_plain_choice)
            return sse_plain_chunk("chat.completion.chunk", request_id, created, model_name, choices)

        for index in range(request.n):  # with return_token_ids, the first chunk carries the prompt's ids
            first_ids = prompt["prompt_token_ids"] if request.return_token_ids and index == 0 else None
            yield chunk([ChatCompletionResponseStreamChoice(index=index, delta=DeltaMessage(role="assistant",
                                                                                            content=""))],
                        prompt_token_ids=first_ids)
        num_generated = 0
        plain = fmt.is_plain
        as_dicts = plain and _is_plain_stream(request)
        choice_streams = {index: fmt.choice_stream() for index in range(request.n)} if not plain else {}
        try:
            async with aclosing(merge_generations(self.ctx.engine, [prompt], [params], request_id,
                                                  request.priority, self.ctx.models.lora_request(request.model),
                                                  request.timeout)) as outputs:
                async for _, output in outputs:
                    choices = []
                    for completion in output.outputs:
                        num_generated += len(completion.token_ids)
                        if plain:
                            choice = _plain_choice(completion) if as_dicts else self._stream_choice(request, completion)
                            if choice is not None:
                                choices.append(choice)
                            continue
                        for read_choice in choice_streams[completion.index].choices(
                                completion, self._logprobs(request, completion), request.logprobs,
                                request.return_token_ids):
                            yield chunk([read_choice])
                    if choices:
                        yield plain_chunk(choices) if as_dicts else chunk(choices)
        except ValueError as exc:
            yield sse_error(from_value_error(exc, _FIELDS, default_param="messages"))
        except Exception as exc:  # noqa: BLE001 - engine stopped or a step failed: say so, end the stream
            yield sse_error(stream_failure(exc, request_id))
        else:
            if request.include_usage_in_stream:
                yield chunk([], make_usage(len(prompt["prompt_token_ids"]), num_generated))
        yield SSE_DONE

    def _stream_choice(self, request: ChatCompletionRequest,
                       completion: CompletionOutput) -> ChatCompletionResponseStreamChoice | None:
        logprobs = self._logprobs(request, completion)
        token_ids = list(completion.token_ids) if request.return_token_ids else None
        if not completion.text and logprobs is None and completion.finish_reason is None and not token_ids:
            return None  # nothing to say yet (text held back until its character is complete)
        return ChatCompletionResponseStreamChoice(
            index=completion.index,
            delta=DeltaMessage(content=completion.text or None),
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            token_ids=token_ids,
        )


def _is_plain_stream(request: ChatCompletionRequest) -> bool:
    """Its chunks carry content and finish state only (no logprobs, no token ids): most chat streams."""
    return not request.logprobs and not request.return_token_ids


def _plain_choice(completion: CompletionOutput) -> dict[str, Any] | None:
    """The JSON fields of a plain stream's ChatCompletionResponseStreamChoice (as its model serializes them: an
    empty delta is ``{}``, token ids left out), or None when there is nothing to say yet (text held back until its
    character is complete)."""
    if not completion.text and completion.finish_reason is None:
        return None
    return {"index": completion.index, "delta": {"content": completion.text} if completion.text else {},
            "logprobs": None, "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}


def _plan_tools(request: ChatCompletionRequest, auto_tool_parser: str | None) -> ToolPlan:
    """Check tools and tool_choice ("auto" reads ``auto_tool_parser``'s format; None: refused, as vLLM does
    without --enable-auto-tool-choice); a forced call ("required", a named function) is a grammar, so it cannot be
    combined with another output constraint or with beam search."""
    plan = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls, auto_tool_parser)
    if plan.constrained:
        other = request.structured_outputs_field
        if other is not None:
            raise OpenAIError(f"tool_choice {request.tool_choice!r} cannot be combined with {other}",
                              param="tool_choice")
        if request.use_beam_search:
            raise OpenAIError("tool_choice 'required' or a named function cannot be combined with use_beam_search",
                              param="tool_choice")
    return plan


def _check_supported(request: ChatCompletionRequest) -> None:
    if request.top_logprobs is not None and not request.logprobs:
        raise OpenAIError("top_logprobs needs logprobs set to true", param="top_logprobs")
