"""Pydantic models of OpenAI's Responses API (``POST /v1/responses``): the request with its input items, function
tools and text format; the response with its output items; the server-sent events of a streamed response.

Requests follow ``protocol.py``'s rules (strict types, unknown fields kept and ignored). OpenAI fields this server
cannot honour (built-in tools, background mode, reasoning effort, ...) are modelled so that setting them is a clear
400, never silently ignored: ``serving_responses`` checks them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from pagedllm.entrypoints.openai.protocol import OpenAIBaseModel, RequestModel

MAX_METADATA_KEYS = 16  # OpenAI's bounds on metadata, which a stored response keeps and every answer echoes
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


# ---- request: input items ----------------------------------------------------------------------------------------


class InputTextPart(RequestModel):
    """A text part of an input message: ``input_text``, or ``output_text`` in an assistant message given back."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessageItem(RequestModel):
    """A message of the conversation; ``type`` may be left out (OpenAI's "easy input message")."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputTextPart]


class FunctionCallItem(RequestModel):
    """A call the model made earlier (an output item given back as input)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # a JSON text


class FunctionCallOutputItem(RequestModel):
    """What the client's function returned for the call ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputTextPart]


class ReasoningInputItem(RequestModel):
    """A reasoning item of an earlier output given back as input. It adds nothing to the prompt: chat templates
    leave the reasoning of earlier turns out too."""

    type: Literal["reasoning"]


_ITEM_TAGS = {"message": "InputMessageItem", "function_call": "FunctionCallItem",
              "function_call_output": "FunctionCallOutputItem", "reasoning": "ReasoningInputItem"}


def _input_item_tag(value: Any) -> str | None:
    """The item model a value is validated as, from its ``type`` (absent: a message)."""
    item_type = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return _ITEM_TAGS.get(item_type, str(item_type)[:64]) if item_type is not None else None


InputItem = Annotated[
    Annotated[InputMessageItem, Tag("InputMessageItem")]
    | Annotated[FunctionCallItem, Tag("FunctionCallItem")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutputItem")]
    | Annotated[ReasoningInputItem, Tag("ReasoningInputItem")],
    Discriminator(_input_item_tag, custom_error_type="invalid_input_item",
                  custom_error_message="an input item must be a message, a function_call, a function_call_output "
                                       "or a reasoning item (other item types are not supported by this server)"),
]


# ---- request: tools and text format ------------------------------------------------------------------------------


class ResponsesTool(RequestModel):
    """A tool: ``{"type": "function", "name", "description", "parameters", "strict"}``. Other types (OpenAI's
    built-in tools) are refused by the handler with a message naming them."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the grammar of a forced call always follows the schema


class ToolChoiceFunction(RequestModel):
    """``tool_choice`` naming a function: ``{"type": "function", "name": ...}``."""

    type: str
    name: str | None = None


class TextFormat(RequestModel):
    """``text.format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "name", "schema", "description", "strict"}``."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(RequestModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # only "medium" (the default) is honoured


# ---- request -----------------------------------------------------------------------------------------------------


class ResponsesRequest(RequestModel):
    """``POST /v1/responses``."""

    model: str | None = None  # None = the served model
    input: str | list[InputItem] | None = None
    instructions: str | None = None  # a system message first; not carried over by previous_response_id
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True  # keep the response for previous_response_id (--max-stored-responses, least recent goes)
    previous_response_id: str | None = None
    # pagedllm's own (as on the other generation routes): a server-side deadline in seconds; past it the request is
    # aborted (KV freed) with a 408, or an error event if it streams.
    timeout: float | None = Field(None, gt=0)
    # Identifiers OpenAI uses for caching and abuse detection: accepted, no effect here.
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # OpenAI's features this server does not have: setting them is a 400 (see serving_responses).
    background: bool = False
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    service_tier: str | None = None


# ---- response ----------------------------------------------------------------------------------------------------


class OutputText(OpenAIBaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(OpenAIBaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(OpenAIBaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str  # a JSON text


class ReasoningText(OpenAIBaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(OpenAIBaseModel):
    """What a reasoning model wrote before its answer (with ``--reasoning-parser``); no summaries are made."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ReasoningText]


OutputItem = OutputReasoning | OutputMessage | OutputFunctionCall


class InputTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIBaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIBaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


def make_response_usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> ResponseUsage:
    return ResponseUsage(input_tokens=input_tokens, output_tokens=output_tokens,
                         total_tokens=input_tokens + output_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens))


class IncompleteDetails(OpenAIBaseModel):
    reason: Literal["max_output_tokens"]


class ResponsesResponse(OpenAIBaseModel):
    """A response: its output items, status and usage, and the request's settings echoed back."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: Literal["disabled"] = "disabled"
    user: str | None = None
    background: bool = False


# ---- stream events -----------------------------------------------------------------------------------------------


class ResponseStreamEvent(OpenAIBaseModel):
    """One server-sent event of a streamed response; ``sequence_number`` counts the stream's events from 0."""

    type: str
    sequence_number: int


class ResponseLifecycleEvent(ResponseStreamEvent):
    """``response.created``, ``response.in_progress``, ``response.completed`` or ``response.incomplete``."""

    response: ResponsesResponse


class OutputItemEvent(ResponseStreamEvent):
    """``response.output_item.added`` or ``response.output_item.done``."""

    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseStreamEvent):
    """``response.content_part.added`` or ``response.content_part.done``."""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText | ReasoningText


class OutputTextDeltaEvent(ResponseStreamEvent):
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputTextDoneEvent(ResponseStreamEvent):
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ReasoningTextDeltaEvent(ResponseStreamEvent):
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str


class ReasoningTextDoneEvent(ResponseStreamEvent):
    item_id: str
    output_index: int
    content_index: int = 0
    text: str


class FunctionCallArgumentsDeltaEvent(ResponseStreamEvent):
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(ResponseStreamEvent):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ResponseErrorEvent(ResponseStreamEvent):
    """``error``: the stream failed after its 200; OpenAI's clients raise on it."""

    message: str
    code: str | None = None
    param: str | None = None
