"""What the completion and chat handlers share: the served model names, request parsing, prompt-length and
max_tokens checks, running engine requests (several at once, aborted when the client goes), and SSE framing."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import pydantic_core
from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from pagedllm.entrypoints.generation_config import GenerationDefaults
from pagedllm.entrypoints.openai.admission import deadline_error
from pagedllm.entrypoints.openai.errors import OpenAIError, from_validation_errors, nesting_too_deep, quote_bounded
from pagedllm.entrypoints.openai.limits import RequestLimits
from pagedllm.entrypoints.openai.lora_modules import ServedLoRAs
from pagedllm.entrypoints.openai.protocol import ModelCard, ModelList, SamplingFields
from pagedllm.lora.request import LoRARequest
from pagedllm.params import RequestOutput, SamplingParams
from pagedllm.structured_output.compile_pool import GrammarCompileAbandoned
from pagedllm.structured_output.manager import GrammarQueueFull

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=BaseModel)
SSE_DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its engine requests were aborted."""


@dataclass(frozen=True)
class ServedModels:
    """The names a server answers to (the first is reported in responses) and what /v1/models says of them. Where
    the model lives on disk is deliberately not here: no response shows a server's paths."""

    names: tuple[str, ...]
    max_model_len: int
    loras: ServedLoRAs | None = None  # the LoRA adapters served by name (None: LoRA off)

    @property
    def default_name(self) -> str:
        return self.names[0]

    def check(self, requested: str | None) -> str:
        """The name to report for a request's ``model``; unset means the served model, an adapter's name is itself.
        Unknown names are a 404."""
        if requested is None or requested in self.names:
            return self.default_name
        if self.lora_request(requested) is not None:
            return requested
        raise _model_not_found(requested)

    def lora_request(self, requested: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names, or None (the base model)."""
        return None if self.loras is None else self.loras.get(requested)

    def model_list(self) -> ModelList:
        adapters = [] if self.loras is None else self.loras.all()
        return ModelList(data=[*(self._card(name) for name in self.names), *map(self._adapter_card, adapters)])

    def model_card(self, name: str) -> ModelCard:
        """``GET /v1/models/{name}``: the card of one served name or adapter; an unknown name is a 404."""
        if name in self.names:
            return self._card(name)
        adapter = self.lora_request(name)
        if adapter is None:
            raise _model_not_found(name)
        return self._adapter_card(adapter)

    def _adapter_card(self, adapter: LoRARequest) -> ModelCard:
        """An adapter's card: its parent is the base model (its path on disk is not shown)."""
        parent = adapter.base_model_name or self.default_name
        return ModelCard(id=adapter.lora_name, root=adapter.lora_name, parent=parent, max_model_len=self.max_model_len)

    def _card(self, name: str) -> ModelCard:
        return ModelCard(id=name, root=name, max_model_len=self.max_model_len)


def _model_not_found(name: str) -> OpenAIError:
    return OpenAIError(f"The model `{quote_bounded(name)}` does not exist.", HTTPStatus.NOT_FOUND, param="model",
                       code="model_not_found")


@dataclass(frozen=True)
class ServingContext:
    """Everything a handler needs, built once per app."""

    engine: AsyncEngine
    models: ServedModels
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    chat_template: str | None
    limits: RequestLimits = RequestLimits()
    generation_defaults: GenerationDefaults = GenerationDefaults()  # for the sampling fields a request leaves unset
    reasoning_parser: str | None = None  # --reasoning-parser
    auto_tool_parser: str | None = None  # --tool-call-parser with --enable-auto-tool-choice; None refuses "auto"


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- parsing and checks ------------------------------------------------------------------------------------------


async def parse_body(raw_request: Request, model: type[RequestT]) -> RequestT:
    """Check the content type, read the body (the size limit applies while it is read, see ``http_guards``),
    then parse and validate it ourselves, so that malformed JSON, a wrong type or a missing field all become the
    same OpenAI-shaped 400."""
    return validate_body(await read_json_body(raw_request), model)


async def read_json_body(raw_request: Request) -> bytes:
    """The raw body of a request that says it is JSON. Anything else is a 415: a web page can make a browser send
    a form or text/plain across sites without asking first (no CORS preflight), but never application/json."""
    check_json_content_type(raw_request.headers.get("content-type"))
    return await raw_request.body()


def check_json_content_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        shown = f"'{quote_bounded(media_type)}'" if media_type else "no Content-Type"
        raise OpenAIError(f"Unsupported Media Type: only 'application/json' is accepted, got {shown}",
                          HTTPStatus.UNSUPPORTED_MEDIA_TYPE, code="unsupported_media_type")


def validate_body(body: bytes, model: type[RequestT]) -> RequestT:
    """The body validated as ``model``; bad JSON, deep nesting, a wrong type or a missing field are a 400."""
    try:
        request = model.model_validate_json(body or b"null")
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(include_url=False)) from None
    except RecursionError:  # a validator that walks a nested value (e.g. a schema) ran out of stack
        raise nesting_too_deep() from None
    if getattr(request, "model_extra", None):
        # vLLM's wording, so log searches work for both; the list quoted up to a bound (a body may hold 100k keys).
        unknown = quote_bounded(", ".join(sorted(request.model_extra)), 500)
        logger.info("The following fields were present in the request but ignored: {%s}", unknown)
    return request


def client_id(raw_request: Request) -> str | None:
    """Who sent a request, for per-client limits: the peer's address (None when the transport does not say)."""
    return raw_request.client.host if raw_request.client else None


def check_stream_options(request: SamplingFields) -> None:
    if request.stream_options is not None and not request.stream:
        raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")


def check_prompt_length(num_prompt_tokens: int, max_model_len: int, param: str) -> None:
    if num_prompt_tokens == 0:
        raise OpenAIError("The prompt is empty: it must contain at least one token", param=param)
    if num_prompt_tokens >= max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {num_prompt_tokens} "
            "tokens, which leaves no room for generated tokens. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:  # the first bad id only, itself bounded (a JSON integer can have any number of digits)
        raise OpenAIError(f"Token id {quote_bounded(bad)} is out of vocabulary (vocab_size={vocab_size})", param=param)


def resolve_max_tokens(requested: int | None, is_explicit: bool, num_prompt_tokens: int, max_model_len: int,
                       param: str = "max_tokens", default: int | None = None) -> int | None:
    """An explicit max_tokens that does not fit the context is a 400 (as in OpenAI and vLLM); a default one
    (completions' 16, or ``default`` for an unset one: the server's --max-tokens-default or the model's
    max_new_tokens) is capped to what fits; None means the rest of the context."""
    room = max_model_len - num_prompt_tokens
    if requested is None:
        requested, is_explicit = default, False
    if requested is None or requested < 1:
        return requested  # None: the rest of the context; < 1: SamplingParams names the error
    if requested <= room:
        return requested
    if not is_explicit:
        return room
    raise OpenAIError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} for the completion). "
        f"Reduce the prompt or {param}.",
        param=param,
        code="context_length_exceeded",
    )


def check_structured_outputs(request: SamplingFields) -> None:
    """Output constraints are not applied by beam search: asking for both is a 400."""
    param = request.structured_outputs_field
    if param is not None and request.use_beam_search:
        raise OpenAIError(f"{param} cannot be combined with use_beam_search", param=param)


async def prepare_structured_outputs(ctx: ServingContext, request: SamplingFields, params: SamplingParams,
                                     param: str | None = None, client_id: str | None = None) -> None:
    """Parse and compile the request's output constraint before anything runs, so that a spec the engine rejects
    (invalid JSON schema or regex, a grammar that does not compile in time) is a 400 naming the field, for streams
    too. Compiling runs in the grammar compile worker processes (it never holds this loop); the compiled grammar is
    cached, so the engine request that follows finds it ready. A client (``client_id``, e.g. its address) with too
    many compiles pending gets a 429; a server shutting down, a 503."""
    spec = params.structured_outputs
    if spec is None:
        return
    param = param or request.structured_outputs_field or "structured_outputs"
    try:
        manager = ctx.engine.structured_output_manager
        future = manager.prepare(spec, client_id=client_id)
        # shield: a timeout here must not cancel the shared (cached) compilation. The pool fails the compile at its
        # deadline; this wait is only a backstop.
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), manager.max_wait_s + 5.0)
    except ValueError as exc:
        raise OpenAIError(_structured_outputs_message(str(exc), param), param=param) from None
    except GrammarQueueFull as exc:
        raise OpenAIError(str(exc), HTTPStatus.TOO_MANY_REQUESTS, param=param,
                          code="too_many_pending_grammars") from None
    except GrammarCompileAbandoned as exc:
        raise OpenAIError(str(exc), HTTPStatus.SERVICE_UNAVAILABLE, param=param) from None
    except asyncio.TimeoutError:
        raise OpenAIError(f"{param}: the grammar took longer than {manager.compile_timeout_s:g} s to compile",
                          param=param) from None


def _structured_outputs_message(message: str, param: str) -> str:
    """``message`` naming the field the client gave (``response_format`` for OpenAI's form of a constraint)."""
    if param == "response_format":
        message = message.replace("structured_outputs.json_object", "response_format json_object")
        message = message.replace("structured_outputs.json", "response_format.json_schema.schema")
    return message


# ---- running engine requests -------------------------------------------------------------------------------------


async def merge_generations(
    engine: AsyncEngine, prompts: Sequence[dict[str, Any]], params: Sequence[SamplingParams], request_id: str,
    priority: int = 0, lora_request: LoRARequest | None = None, timeout_s: float | None = None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of one engine request per prompt as ``(prompt index, output)``, in arrival order. When the consumer
    stops early (client gone, error), every engine request still running is aborted."""
    # aclosing: closing this generator closes the engine's at once (which aborts), not whenever it is collected.
    if len(prompts) == 1:  # the common case: no tasks, no queue
        request = engine.generate(prompts[0], params[0], request_id, priority, lora_request, timeout_s)
        async with aclosing(request) as outputs:
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            request = engine.generate(prompts[index], params[index], f"{request_id}-{index}", priority, lora_request,
                                      timeout_s)
            async with aclosing(request) as outputs:
                async for output in outputs:
                    queue.put_nowait((index, output))
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(index)) for index in range(len(prompts))]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        # Cancelling a pump closes its engine generator, which aborts the request; no await here, so this also
        # runs inside a cancelled scope.
        for task in tasks:
            task.cancel()


async def wait_for_disconnect(raw_request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so only a disconnect is left)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(raw_request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (aborting its engine requests) and raise
    ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (server shutdown)
        watcher.cancel()
        if not task.done():
            task.cancel()  # its engine generators close in the background and abort their requests
    if not task.done():
        raise ClientDisconnected()
    return task.result()


def stream_failure(exc: Exception, request_id: str | None = None) -> OpenAIError:
    """The error event of a stream that the engine could not finish. It says only what concerns this request: the
    text of an unexpected exception may be about another request (or the server's insides), so it goes to the
    server log, and the client gets the request id to quote."""
    if isinstance(exc, EngineDeadError):  # our own message, about the engine as a whole
        return OpenAIError(str(exc), HTTPStatus.SERVICE_UNAVAILABLE, code="engine_unavailable")
    if isinstance(exc, RequestFailedError):  # the engine's message about this request only
        return OpenAIError(str(exc), HTTPStatus.INTERNAL_SERVER_ERROR, code="request_failed")
    if (dropped := deadline_error(exc)) is not None:  # a queue delay or the request's timeout passed
        return dropped
    return internal_error(exc, request_id, "while generating")


def internal_error(exc: BaseException, request_id: str | None, doing: str) -> OpenAIError:
    """A 500 that names no detail of ``exc``; the detail is logged with the request id."""
    request_id = request_id or random_id("error")
    logger.error("Internal error %s (request id %s)", doing, request_id, exc_info=exc)
    return OpenAIError(f"Internal error {doing} (request id {request_id})", HTTPStatus.INTERNAL_SERVER_ERROR,
                       code="internal_error")


def json_response(body: BaseModel) -> Response:
    """A JSON response serialized by pydantic (fast; a non-finite float becomes null instead of an error)."""
    return Response(content=body.model_dump_json(), media_type="application/json")


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def sse_plain_chunk(object_name: str, request_id: str, created: int, model_name: str,
                    choices: list[dict[str, Any]]) -> bytes:
    """``sse`` of a stream chunk (``object_name``: "text_completion", "chat.completion.chunk") whose choices are
    given as plain dicts, lists and scalars, skipping the models' validation (a stream's hottest path: one chunk per
    stream and step). pydantic-core serializes both, so the bytes are those of ``sse`` of the equivalent model
    (usage null mid-stream, non-finite floats null, as the models send them)."""
    chunk = {"id": request_id, "object": object_name, "created": created, "model": model_name, "choices": choices,
             "usage": None}
    return b"data: " + pydantic_core.to_json(chunk, inf_nan_mode="null") + b"\n\n"


def sse_error(error: OpenAIError) -> str:
    """An error inside a stream that already answered 200: OpenAI clients raise on an ``error`` event."""
    body = {"message": error.message, "type": error.error_type, "param": error.param, "code": error.code}
    return "data: " + json.dumps({"error": body}, ensure_ascii=False) + "\n\n"
