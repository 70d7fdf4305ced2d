"""Pydantic models of the OpenAI API that the server speaks (completions, chat completions, models, errors) plus
vLLM's extras (extra sampling fields, /tokenize, /detokenize).

Requests are validated strictly (a string is not a number, a float is not an int): a wrong type is a 400 naming
the field, as OpenAI answers. Unknown fields are kept (``model_extra``) and ignored, so clients that send newer
OpenAI fields keep working. Range checks live in ``SamplingParams``, the one place that knows them; the server's
work limits (n, logprobs, stop strings...) are flags, checked in ``limits.py``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from pagedllm.entrypoints.chat_utils import check_chat_template_kwargs
from pagedllm.entrypoints.generation_config import GenerationDefaults
from pagedllm.params import STRUCTURED_OUTPUT_KINDS, RequestOutputKind, SamplingParams, StructuredOutputsParams

# vLLM's guided decoding fields (still accepted by vLLM) and the structured_outputs field each maps onto.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
GUIDED_BACKENDS = ("auto", "xgrammar")  # the grammar backend this server has; "auto" picks it


class OpenAIBaseModel(BaseModel):
    """Base of the response models: unknown fields are kept, so a model built from a dict round-trips."""

    model_config = ConfigDict(extra="allow")


class RequestModel(BaseModel):
    """Base of the request models: strict types, unknown fields kept (and ignored) in ``model_extra``; ``null`` for
    a field that cannot be null means its default, as many clients send it for "unset"."""

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or _accepts_null(cls, key)}


def _accepts_null(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    if field is None or field.is_required():
        return True  # unknown fields are ignored anyway; a required one must not silently vanish
    return field.annotation is None or type(None) in get_args(field.annotation)


# ---- errors ------------------------------------------------------------------------------------------------------


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error body."""

    error: ErrorInfo


# ---- shared pieces -----------------------------------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def make_usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


class JsonSchemaFormat(RequestModel):
    """``response_format.json_schema``: OpenAI's ``{"name", "description", "schema", "strict"}``. The grammar always
    enforces the schema, so ``strict`` changes nothing."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """OpenAI's ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {...}}``."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(RequestModel):
    """Sampling fields common to completions and chat: OpenAI's, then vLLM's extras."""

    model: str | None = None  # None = the served model (OpenAI requires it; vLLM does not)
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0)  # at most --max-logprobs
    priority: int = 0  # lower is scheduled sooner, under --scheduling-policy priority
    # pagedllm's own: a server-side deadline in seconds; past it the request is aborted (KV freed) with a 408.
    timeout: float | None = Field(None, gt=0)
    use_beam_search: bool = False  # n is then the beam width; see serving_beam_search.py
    length_penalty: float = 1.0  # beam search: a hypothesis scores cumulative logprob / length ** length_penalty
    # Constrained output: OpenAI's response_format, or vLLM's structured_outputs (exactly one of json, regex,
    # choice, grammar, json_object); not both.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's older guided decoding fields: each is one kind of structured_outputs.
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # "auto" or "xgrammar": the one backend there is
    guided_whitespace_pattern: str | None = None  # not supported: rejected when given
    # vLLM's token-id extras: the ids of the prompt and of each choice; logprobs' tokens as "token_id:{id}".
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False

    @property
    def guided_fields(self) -> list[str]:
        """The guided_* constraint fields this request sets."""
        return [name for name in GUIDED_FIELDS if getattr(self, name) is not None]

    @property
    def structured_outputs_field(self) -> str | None:
        """The request field that constrains the output, if any (the first one, when several clash)."""
        if self.structured_outputs is not None:
            return "structured_outputs"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        guided = self.guided_fields
        return guided[0] if guided else None

    def build_structured_outputs(self) -> StructuredOutputsParams | None:
        """The constraint of ``response_format`` or ``structured_outputs``; ValueError (starting with the field's
        name) for a bad one. Only the shape is checked here: whether the spec compiles is checked by the engine."""
        self._check_single_constraint()
        self._check_guided_options()
        if self.guided_fields:
            return self._build_guided()
        response_format = self.response_format
        if self.structured_outputs is not None:
            if response_format is not None and response_format.type != "text":
                raise ValueError("structured_outputs cannot be combined with a response_format other than "
                                 "'text': give one of them")
            unknown = sorted(set(self.structured_outputs) - set(STRUCTURED_OUTPUT_KINDS))
            if unknown:
                raise ValueError(f"structured_outputs has unsupported fields {unknown}; it takes exactly one of "
                                 f"{', '.join(STRUCTURED_OUTPUT_KINDS)}")
            fields = {key: value for key, value in self.structured_outputs.items() if value is not None}
            return StructuredOutputsParams(**fields)
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if response_format.type == "json_schema":
            if response_format.json_schema is None or response_format.json_schema.schema_ is None:
                raise ValueError("response_format of type 'json_schema' needs json_schema.schema, a JSON schema "
                                 "object")
            return StructuredOutputsParams(json=response_format.json_schema.schema_)
        raise ValueError(f"response_format type {response_format.type!r} is not supported; use 'text', "
                         "'json_object' or 'json_schema'")

    def _check_single_constraint(self) -> None:
        """At most one output constraint: two guided_* fields, or one with structured_outputs or a response_format,
        are a ValueError naming the guided field (structured_outputs against response_format is checked below)."""
        guided = self.guided_fields
        others = [name for name in ("structured_outputs", "response_format") if self.structured_outputs_field == name]
        clashing = guided[1:] + others
        if guided and clashing:
            raise ValueError(f"{guided[0]} cannot be combined with {clashing[0]}: give one output constraint")

    def _check_guided_options(self) -> None:
        """The guided options are honoured or refused, never silently dropped."""
        if self.guided_decoding_backend is not None and self.guided_decoding_backend not in GUIDED_BACKENDS:
            raise ValueError(f"guided_decoding_backend {self.guided_decoding_backend[:64]!r} is not available; this "
                             f"server has {', '.join(repr(b) for b in GUIDED_BACKENDS)}")
        if self.guided_whitespace_pattern is not None:
            raise ValueError("guided_whitespace_pattern is not supported by this server")

    def _build_guided(self) -> StructuredOutputsParams:
        (name,) = self.guided_fields
        try:
            return StructuredOutputsParams(**{GUIDED_FIELDS[name]: getattr(self, name)})
        except ValueError as exc:  # its message names structured_outputs.<kind>: name the field the client gave
            raise ValueError(str(exc).replace(f"structured_outputs.{GUIDED_FIELDS[name]}", name)) from None

    def build_sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
        defaults: GenerationDefaults = GenerationDefaults(),
    ) -> SamplingParams:
        """SamplingParams for one prompt, ``defaults`` (the model's generation config) filling the sampling fields
        it leaves unset; raises ValueError naming the field for an invalid value."""
        return SamplingParams(
            n=self.n,
            temperature=_or(self.temperature, defaults.temperature, 1.0),
            top_p=_or(self.top_p, defaults.top_p, 1.0),
            top_k=_or(self.top_k, defaults.top_k, 0),
            min_p=_or(self.min_p, defaults.min_p, 0.0),
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, defaults.repetition_penalty, 1.0),
            logit_bias=self.logit_bias,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=self.build_structured_outputs(),
            # Streams want only what is new at each step; a full response wants one output at the end.
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _or(*values: Any) -> Any:
    """The first value that is not None."""
    return next(value for value in values if value is not None)


# ---- completions -------------------------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)  # at most --max-logprobs (vLLM's bound, not OpenAI's 5)
    suffix: str | None = None  # not supported: rejected when given
    best_of: int | None = None  # only best_of == n (or unset) is supported
    add_special_tokens: bool = True  # vLLM: add BOS etc. when tokenizing a text prompt


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended the text
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | None = None  # vLLM, with return_token_ids: this choice's prompt
    token_ids: list[int] | None = None  # vLLM, with return_token_ids: the generated ids


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class _TokenIdsWhenSet(OpenAIBaseModel):
    """A stream chunk or choice: the return_token_ids fields appear only when set (as vLLM sends them)."""

    @model_serializer(mode="wrap")
    def _token_ids_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items()
                if value is not None or key not in ("token_ids", "prompt_token_ids")}


class CompletionResponseStreamChoice(_TokenIdsWhenSet):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids: in the first chunk of each choice
    token_ids: list[int] | None = None  # with return_token_ids: the ids of this chunk's text


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- chat completions --------------------------------------------------------------------------------------------


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    """One message of a conversation: text content, as a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a "tool" message: the call it answers

    def to_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: role and plain-string content ("developer" is OpenAI's new
        name for "system", which templates know)."""
        if isinstance(self.content, list):
            content = "\n".join(part.text for part in self.content)
        else:
            content = self.content or ""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls is not None:
            message["tool_calls"] = [_template_tool_call(call) for call in self.tool_calls]
        return message


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """An assistant's tool call for the chat template: arguments as an object (templates write them with
    ``tojson``), as vLLM passes them."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _checked_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
    check_chat_template_kwargs(value)
    return value


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)  # at most --max-logprobs
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {name, description, parameters}}]
    tool_choice: str | dict[str, Any] | None = None  # "none", "auto", "required" or {"type": "function", ...}
    parallel_tool_calls: bool = True  # False: tool_choice "required" makes exactly one call
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}; bounded, see chat_utils
    include_reasoning: bool = True  # with --reasoning-parser: False leaves reasoning_content out

    _check_template_kwargs = field_validator("chat_template_kwargs")(_checked_template_kwargs)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # a JSON text


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # with --reasoning-parser: what the model wrote between <think> tags
    tool_calls: list[ToolCall] | None = None


class _WithoutNone(OpenAIBaseModel):
    """A stream delta: fields that are None are left out."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_WithoutNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_WithoutNone):
    """A piece of a streamed tool call: the first carries id, type and name (arguments ""), the next ones
    fragments of the arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM, with return_token_ids: the generated ids


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | None = None  # vLLM, with return_token_ids: the rendered prompt's ids


class DeltaMessage(OpenAIBaseModel):
    """What a chat chunk adds to its message; fields it does not change are left out (the last chunk's is ``{}``)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionResponseStreamChoice(_TokenIdsWhenSet):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids: the ids of this chunk's delta


class ChatCompletionStreamResponse(_TokenIdsWhenSet):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids: in the first chunk only


# ---- models ------------------------------------------------------------------------------------------------------


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---- tokenize / detokenize (vLLM) --------------------------------------------------------------------------------


class TokenizeCompletionRequest(RequestModel):
    """``POST /tokenize`` with a text prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RequestModel):
    """``POST /tokenize`` with a conversation, rendered through the chat template first."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    _check_template_kwargs = field_validator("chat_template_kwargs")(_checked_template_kwargs)


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
