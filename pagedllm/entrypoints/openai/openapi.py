"""What ``/openapi.json`` says of each route: request bodies, answers and errors, from the pydantic models.

The handlers read and validate their bodies themselves (``parse_body``: one error shape for bad JSON, wrong types
and unsupported content types), so FastAPI cannot see the bodies in their signatures. This module writes them
into the schema instead, so that clients generated from it, and fuzzers run against it, know every route's body,
its 200 answer (JSON, an event stream, plain text or nothing) and the OpenAI error body of its 4xx and 503 answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.protocol_embeddings import EmbeddingRequest, EmbeddingResponse
from pagedllm.entrypoints.openai.protocol_responses import ResponsesRequest, ResponsesResponse

_REF = "#/components/schemas/{model}"
# One server-sent event of a stream: ``data`` is a chunk's JSON text (or ``[DONE]``, or an error body).
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
              "required": ["data"]}


@dataclass(frozen=True)
class RouteDoc:
    """One route's documented body and answer: ``answer`` a model (JSON), "text", "empty" or None (as served)."""

    request_models: tuple[type[BaseModel], ...] = ()
    answer: type[BaseModel] | str | None = None
    streams: bool = False  # with "stream": true the 200 answer is a server-sent event stream


ROUTE_DOCS: dict[tuple[str, str], RouteDoc] = {
    ("/v1/completions", "post"): RouteDoc((CompletionRequest,), CompletionResponse, streams=True),
    ("/v1/chat/completions", "post"): RouteDoc((ChatCompletionRequest,), ChatCompletionResponse, streams=True),
    ("/v1/responses", "post"): RouteDoc((ResponsesRequest,), ResponsesResponse, streams=True),
    ("/v1/embeddings", "post"): RouteDoc((EmbeddingRequest,), EmbeddingResponse),
    ("/tokenize", "post"): RouteDoc((TokenizeCompletionRequest, TokenizeChatRequest), TokenizeResponse),
    ("/detokenize", "post"): RouteDoc((DetokenizeRequest,), DetokenizeResponse),
    ("/v1/models", "get"): RouteDoc(answer=ModelList),
    ("/v1/models/{model_id}", "get"): RouteDoc(answer=ModelCard),
    ("/health", "get"): RouteDoc(answer="empty"),
    ("/ping", "get"): RouteDoc(answer="empty"),
    ("/ready", "get"): RouteDoc(answer="empty"),
    ("/metrics", "get"): RouteDoc(answer="text"),
}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (served at /openapi.json) document the routes of ``ROUTE_DOCS``; built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = documented_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign] - FastAPI's documented way to customize the schema


def documented_schema(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    add_component = _component_adder(components)
    error = {"content": {"application/json": {"schema": add_component(ErrorResponse, "serialization")}}}
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            doc = ROUTE_DOCS.get((path, method))
            if doc is not None:
                _document(operation, doc, add_component)
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's own validation shape: never sent, errors are OpenAI-shaped
            responses["4XX"] = {"description": "The request is invalid (OpenAI error body)", **error}
            responses["503"] = {"description": "The engine is unhealthy or the server is draining", **error}
    return spec


def _document(operation: dict[str, Any], doc: RouteDoc, add_component: Callable[..., dict]) -> None:
    if doc.request_models:
        refs = [add_component(model, "validation") for model in doc.request_models]
        schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    operation.setdefault("responses", {})["200"] = _ok_response(doc, add_component)


def _ok_response(doc: RouteDoc, add_component: Callable[..., dict]) -> dict[str, Any]:
    if doc.answer == "empty":
        return {"description": "OK (no body)"}
    if doc.answer == "text":
        return {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    content: dict[str, Any] = {"application/json": {"schema": add_component(doc.answer, "serialization")}}
    if doc.streams:
        content["text/event-stream"] = {"schema": _SSE_EVENT}
    return {"description": "OK", "content": content}


def _component_adder(components: dict[str, Any]) -> Callable[[type[BaseModel], str], dict[str, str]]:
    """``add(model, mode)``: put ``model``'s schema (and its definitions) into ``components``; a ``$ref`` to it.
    Output schemas get their own names: a field with a default is optional in a request, always present in an
    answer."""

    def add(model: type[BaseModel], mode: str) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=_REF, mode=mode)
        for name, definition in schema.pop("$defs", {}).items():
            components.setdefault(name, definition)
        name = model.__name__ if mode == "validation" else f"{model.__name__}Out"
        components.setdefault(name, schema)
        return {"$ref": _REF.format(model=name)}

    return add
