"""``POST /v1/responses``: OpenAI's Responses API on the chat path.

A request becomes a chat conversation (``instructions`` as a system message first, then the stored conversation of
``previous_response_id``, then its ``input`` items), rendered by the chat template and run with the same tool-call
and structured-output grammars as ``/v1/chat/completions``; the generated text is read as a chat message is
(``chat_output.OutputFormat``: reasoning with ``--reasoning-parser``, content, tool calls). Its output is a
``reasoning`` item, a ``message`` item and ``function_call`` items, whole or streamed as OpenAI's typed server-sent
events (``response.created`` ... ``response.completed``; see ``responses_output``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagedllm.entrypoints.openai.chat_output import OutputFormat
from pagedllm.entrypoints.openai.errors import OpenAIError, from_value_error, quote_bounded
from pagedllm.entrypoints.openai.limits import LimitExceeded, check_tools_limit
from pagedllm.entrypoints.openai.offload import off_loop
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.protocol_responses import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputItem,
    InputMessageItem,
    InputTextPart,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
    TextConfig,
    ToolChoiceFunction,
    make_response_usage,
)
from pagedllm.entrypoints.openai.response_store import ResponseStore, StoredResponse
from pagedllm.entrypoints.openai.responses_output import ResponseStreamWriter, new_id, output_items, response_status
from pagedllm.entrypoints.openai.serving_chat import render_messages
from pagedllm.entrypoints.openai.serving_common import (
    ServingContext,
    check_prompt_length,
    client_id,
    json_response,
    merge_generations,
    prepare_structured_outputs,
    resolve_max_tokens,
    run_unless_disconnected,
    stream_failure,
)
from pagedllm.entrypoints.openai.tool_calls import ToolPlan, plan_tools
from pagedllm.params import RequestOutput, SamplingParams, StructuredOutputsParams

_FIELDS = tuple(ResponsesRequest.model_fields)
ChatMessages = list[dict[str, Any]]


@dataclass
class _ResponseRun:
    """One accepted request on its way through the engine: what building its response needs."""

    request: ResponsesRequest
    response_id: str
    model_name: str
    prompt: dict[str, Any]
    params: SamplingParams
    output_format: OutputFormat  # how the generated text is read (reasoning, content, tool calls)
    conversation: ChatMessages  # the input as chat messages, without the instructions (what a store keeps)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt["prompt_token_ids"])

    def response(self, status: str, output: list[OutputItem], usage: ResponseUsage | None) -> ResponsesResponse:
        """The response object with ``status`` and ``output``, the request's settings echoed back."""
        request = self.request
        return ResponsesResponse(
            id=self.response_id, status=status, model=self.model_name, output=output, usage=usage,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=request.instructions, max_output_tokens=request.max_output_tokens,
            metadata=request.metadata or {}, parallel_tool_calls=request.parallel_tool_calls,
            previous_response_id=request.previous_response_id, store=request.store,
            temperature=self.params.temperature, top_p=self.params.top_p, text=_text_echo(request.text),
            tool_choice=_tool_choice_echo(request), user=request.user,
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools or ()],
        )

    def usage(self, num_generated: int) -> ResponseUsage:
        return make_response_usage(self.num_prompt_tokens, num_generated)  # cached tokens: not counted per request


class OpenAIServingResponses:
    """Serves ``/v1/responses`` from the engine, and keeps stored responses for ``previous_response_id``."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.store = ResponseStore(ctx.limits.max_stored_responses)

    async def create_response(self, request: ResponsesRequest, raw_request: Request) -> Response:
        run = await self._accept(request, raw_request)
        if request.stream:
            return StreamingResponse(self._stream(run), media_type="text/event-stream")
        try:
            output = await run_unless_disconnected(raw_request, self._generate(run))
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS, default_param="input") from None
        response = self._response(run, output)
        self._remember(run, response)
        return json_response(response)

    async def _accept(self, request: ResponsesRequest, raw_request: Request) -> _ResponseRun:
        """Every check, the rendered prompt and the sampling parameters (constraint compiled), before anything runs:
        whatever is wrong with the request is a 4xx, for streams too."""
        model_name = self.ctx.models.check(request.model)
        check_supported(request)
        self._check_limits(request)
        tools = _plan_tools(request, self.ctx.auto_tool_parser)
        constraint = _output_constraint(request, tools)
        conversation = self._previous_conversation(request.previous_response_id) + input_messages(request.input)
        chat_request = _chat_request(request, _with_instructions(request.instructions, conversation))
        prompt = await self._render(chat_request)
        check_prompt_length(len(prompt["prompt_token_ids"]), self.ctx.max_model_len, "input")
        params = self._sampling_params(request, chat_request, len(prompt["prompt_token_ids"]))
        params.structured_outputs = constraint
        if tools.needs_special_tokens:
            params.skip_special_tokens = False  # the format's markers are special tokens: the parser must see them
        await prepare_structured_outputs(self.ctx, chat_request, params, client_id=client_id(raw_request),
                                         param="tools" if tools.constrained else "text.format")
        output_format = OutputFormat(tools, self.ctx.reasoning_parser, prompt["prompt"],
                                     constrained=constraint is not None)
        return _ResponseRun(request, new_id("resp"), model_name, prompt, params, output_format, conversation)

    def _check_limits(self, request: ResponsesRequest) -> None:
        try:
            check_tools_limit(request.tools, self.ctx.limits)
        except LimitExceeded as exc:
            raise OpenAIError(str(exc), param=exc.param) from None
        _check_metadata(request.metadata)

    def _previous_conversation(self, previous_response_id: str | None) -> ChatMessages:
        """The conversation a stored response ended (its input and output); unknown ids are a 400 as in OpenAI."""
        if previous_response_id is None:
            return []
        stored = self.store.get(previous_response_id)
        if stored is None:
            raise OpenAIError(f"Previous response with id '{quote_bounded(previous_response_id)}' not found (it "
                              "was never stored, was created with store=false, or was dropped: this server keeps "
                              f"the {self.store.max_entries} most recently used responses)",
                              param="previous_response_id", code="previous_response_not_found")
        return [dict(message) for message in stored.conversation]

    async def _render(self, chat_request: ChatCompletionRequest) -> dict[str, Any]:
        try:
            return await off_loop(render_messages, self.ctx, chat_request)
        except OpenAIError as exc:  # its wording names the chat route's field
            raise OpenAIError(exc.message.replace("The messages", "The input"), exc.status, param="input") from None

    def _sampling_params(self, request: ResponsesRequest, chat_request: ChatCompletionRequest,
                         num_prompt_tokens: int) -> SamplingParams:
        defaults = self.ctx.generation_defaults  # the model's generation config, --max-tokens-default
        max_tokens = resolve_max_tokens(request.max_output_tokens, True, num_prompt_tokens, self.ctx.max_model_len,
                                        "max_output_tokens", defaults.max_tokens)
        try:
            params = chat_request.build_sampling_params(max_tokens, None, None, defaults)
            params.verify_for_vocab(self.ctx.vocab_size)
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS, default_param=None) from None
        return params

    def _remember(self, run: _ResponseRun, response: ResponsesResponse) -> None:
        if run.request.store:
            conversation = run.conversation + output_messages(response.output)
            self.store.put(StoredResponse(response, tuple(conversation)))

    # ---- whole responses -------------------------------------------------------------------------------------

    async def _generate(self, run: _ResponseRun) -> RequestOutput:
        final = None
        lora = self.ctx.models.lora_request(run.request.model)
        async with aclosing(merge_generations(self.ctx.engine, [run.prompt], [run.params], run.response_id,
                                              lora_request=lora, timeout_s=run.request.timeout)) as outs:
            async for _, output in outs:
                final = output
        return final

    def _response(self, run: _ResponseRun, output: RequestOutput) -> ResponsesResponse:
        (completion,) = output.outputs
        status = response_status(completion.finish_reason)
        items = output_items(run.output_format.read_whole(completion.text), status)
        return run.response(status, items, run.usage(len(completion.token_ids)))

    # ---- streams ---------------------------------------------------------------------------------------------

    async def _stream(self, run: _ResponseRun) -> AsyncIterator[str]:
        """The typed events of one response. When the client goes, Starlette cancels this generator, which
        closes the engine generator: the request is aborted. A failure after the 200 is an ``error`` event."""
        writer = ResponseStreamWriter(run.response)
        yield writer.start()
        reader = run.output_format.choice_stream()
        num_generated, finish_reason = 0, None
        try:
            async with aclosing(merge_generations(self.ctx.engine, [run.prompt], [run.params], run.response_id,
                                                  lora_request=self.ctx.models.lora_request(run.request.model),
                                                  timeout_s=run.request.timeout)) as outputs:
                async for _, output in outputs:
                    (completion,) = output.outputs
                    num_generated += len(completion.token_ids)
                    finish_reason = completion.finish_reason or finish_reason
                    yield writer.deltas(reader.deltas(completion.text, completion.finish_reason is not None))
        except ValueError as exc:
            yield writer.error(from_value_error(exc, _FIELDS, default_param="input"))
            return
        except Exception as exc:  # noqa: BLE001 - engine stopped or a step failed: say so, end the stream
            yield writer.error(stream_failure(exc, run.response_id))
            return
        events, response = writer.finish(response_status(finish_reason), run.usage(num_generated))
        self._remember(run, response)
        yield events


# ---- output items as conversation -------------------------------------------------------------------------------


def output_messages(output: list[OutputItem]) -> ChatMessages:
    """A response's output as the chat messages that continue its conversation (reasoning left out, as chat
    templates leave out the reasoning of earlier turns)."""
    items: list[InputItem] = []
    for item in output:
        if isinstance(item, OutputMessage):
            items.append(_assistant_text(item))
        elif isinstance(item, OutputFunctionCall):
            items.append(FunctionCallItem(type="function_call", call_id=item.call_id, name=item.name,
                                          arguments=item.arguments))
    return input_messages(items)


def _assistant_text(message: OutputMessage) -> InputMessageItem:
    return InputMessageItem(role="assistant", content="".join(part.text for part in message.content))


# ---- input -------------------------------------------------------------------------------------------------------


def input_messages(items: str | list[InputItem] | None) -> ChatMessages:
    """Input items as chat messages: a string is one user message; a function_call joins the assistant turn
    before it (an assistant's text and its calls are one chat message), a function_call_output is a tool
    message, a reasoning item adds nothing."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: ChatMessages = []
    for item in items:
        if isinstance(item, FunctionCallItem):
            _append_call(messages, item)
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text_of(item.output)})
        elif isinstance(item, InputMessageItem):
            messages.append({"role": item.role, "content": _text_of(item.content)})
    return messages


def _append_call(messages: ChatMessages, item: FunctionCallItem) -> None:
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last["tool_calls"] = [*last.get("tool_calls", ()), call]
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _text_of(content: str | list[InputTextPart]) -> str:
    """A message's text; parts are joined by newlines, as the chat route joins text parts."""
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


def _with_instructions(instructions: str | None, conversation: ChatMessages) -> ChatMessages:
    head = [{"role": "system", "content": instructions}] if instructions is not None else []
    messages = head + conversation
    if not messages:
        raise OpenAIError("input is empty: give a string or at least one input item", param="input")
    return messages


def _chat_request(request: ResponsesRequest, messages: ChatMessages) -> ChatCompletionRequest:
    """The chat request whose rendering and sampling parameters this request shares (its messages are built from
    validated items: they validate)."""
    return ChatCompletionRequest.model_validate({
        "messages": messages, "tools": _chat_tools(request), "temperature": request.temperature,
        "top_p": request.top_p, "stream": request.stream, "user": request.user,
    })


# ---- tools and output constraints --------------------------------------------------------------------------------


def _chat_tools(request: ResponsesRequest) -> list[dict[str, Any]] | None:
    """The function tools in the chat route's shape ``{"type": "function", "function": {...}}``."""
    chat_tools = []
    for index, tool in enumerate(request.tools or ()):
        if tool.type != "function":
            raise OpenAIError(f"tools[{index}]: tools of type '{quote_bounded(tool.type)}' are not supported by "
                              "this server (it has no built-in tools); only function tools", param="tools")
        if tool.name is None:
            raise OpenAIError(f"tools[{index}].name is required", param="tools")
        function = {"name": tool.name, "parameters": tool.parameters}
        if tool.description is not None:
            function["description"] = tool.description
        chat_tools.append({"type": "function", "function": function})
    return chat_tools or None


def _chat_tool_choice(tool_choice: str | ToolChoiceFunction | None) -> str | dict[str, Any] | None:
    if not isinstance(tool_choice, ToolChoiceFunction):
        return tool_choice
    if tool_choice.type != "function" or tool_choice.name is None:
        raise OpenAIError('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...} '
                          "(this server has no built-in tools)", param="tool_choice")
    return {"type": "function", "function": {"name": tool_choice.name}}


def _plan_tools(request: ResponsesRequest, auto_tool_parser: str | None) -> ToolPlan:
    """The chat route's tool plan ("auto" reads ``auto_tool_parser``'s format; None: refused, as on the chat
    route); its messages name the fields as this route spells them."""
    try:
        return plan_tools(_chat_tools(request), _chat_tool_choice(request.tool_choice), request.parallel_tool_calls,
                          auto_tool_parser)
    except OpenAIError as exc:
        raise OpenAIError(exc.message.replace(".function.", "."), exc.status, param=exc.param) from None


def _output_constraint(request: ResponsesRequest, tools: ToolPlan) -> StructuredOutputsParams | None:
    """The grammar of a forced tool call or of ``text.format``; both at once is a 400."""
    text_format = _text_format_constraint(request.text)
    if not tools.constrained:
        return text_format
    if text_format is not None:
        raise OpenAIError(f"tool_choice {_tool_choice_echo(request)!r} cannot be combined with a text.format other "
                          "than 'text'", param="tool_choice")
    return tools.structured_outputs()


def _text_format_constraint(text: TextConfig | None) -> StructuredOutputsParams | None:
    text_format = text.format if text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if text_format.schema_ is None:
        raise OpenAIError("text.format of type 'json_schema' needs schema, a JSON schema object", param="text.format")
    try:
        return StructuredOutputsParams(json=text_format.schema_)
    except ValueError as exc:  # its message names vLLM's field
        message = str(exc).replace("structured_outputs.json", "text.format.schema")
        raise OpenAIError(quote_bounded(message, 300), param="text.format") from None


# ---- checks ------------------------------------------------------------------------------------------------------

# OpenAI's fields this server cannot honour: (field, is it set?, why it is refused). Refused, never ignored.
_UNSUPPORTED: tuple[tuple[str, Callable[[ResponsesRequest], bool], str], ...] = (
    ("background", lambda r: r.background, "responses run in the foreground only"),
    ("reasoning", lambda r: any(value is not None for value in (r.reasoning or {}).values()),
     "reasoning effort and summaries cannot be set for this server's models"),
    ("include", lambda r: bool(r.include), "there is no extra output data (logprobs, reasoning) to include"),
    ("truncation", lambda r: r.truncation == "auto", "an input longer than the context is a 400, never truncated"),
    ("top_logprobs", lambda r: bool(r.top_logprobs), "logprobs are served by /v1/chat/completions only"),
    ("max_tool_calls", lambda r: r.max_tool_calls is not None, "the number of tool calls cannot be bounded"),
    ("conversation", lambda r: r.conversation is not None, "there are no stored conversations; use "
                                                           "previous_response_id"),
    ("prompt", lambda r: r.prompt is not None, "there are no stored prompt templates; send input"),
    ("service_tier", lambda r: r.service_tier not in (None, "auto", "default"), "there is one service tier"),
    ("text.verbosity", lambda r: r.text is not None and r.text.verbosity not in (None, "medium"),
     "the output length cannot be steered; use max_output_tokens"),
)


def check_supported(request: ResponsesRequest) -> None:
    """A 400 naming the first field this server cannot honour."""
    for field, is_set, reason in _UNSUPPORTED:
        if is_set(request):
            raise OpenAIError(f"{field} is not supported by this server: {reason}", param=field,
                              code="unsupported_parameter")


def _check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's bounds: a stored response keeps its metadata and every answer echoes it."""
    metadata = metadata or {}
    if len(metadata) > MAX_METADATA_KEYS:
        raise OpenAIError(f"metadata may have at most {MAX_METADATA_KEYS} keys, got {len(metadata)}",
                          param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise OpenAIError(f"metadata keys may have at most {MAX_METADATA_KEY_CHARS} characters and values "
                              f"{MAX_METADATA_VALUE_CHARS} (key '{quote_bounded(key, 64)}')", param="metadata")


# ---- echoes ------------------------------------------------------------------------------------------------------


def _text_echo(text: TextConfig | None) -> dict[str, Any]:
    echo: dict[str, Any] = {"format": {"type": "text"}, "verbosity": "medium"}
    if text is not None and text.format is not None:
        echo["format"] = text.format.model_dump(by_alias=True, exclude_none=True)
    return echo


def _tool_choice_echo(request: ResponsesRequest) -> str | dict[str, Any]:
    if isinstance(request.tool_choice, ToolChoiceFunction):
        return request.tool_choice.model_dump(exclude_none=True)
    return request.tool_choice or "auto"
