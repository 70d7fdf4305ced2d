"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, and the mapping of every kind of
bad input (pydantic validation, ``SamplingParams``' ValueErrors, bad JSON) onto it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse


class OpenAIError(Exception):
    """An error to answer with: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        status: int = HTTPStatus.BAD_REQUEST,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.code = code
        self.error_type = error_type or error_type_for(self.status)
        self.headers = headers  # e.g. Retry-After of a 429

    def to_response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.error_type, param=self.param,
                                             code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def error_type_for(status: int) -> str:
    """OpenAI's ``type``: every client mistake is an ``invalid_request_error``; the server's own are ``server_error``."""
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    return OpenAIError(message, status, param, code).to_response()


MAX_QUOTED_CHARS = 100  # how much of a client's input an error message may quote


def quote_bounded(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` as text for an error message, cut to ``limit`` characters (plus "...") so that an error never
    echoes a megabyte of input back."""
    try:
        text = str(value)
    except ValueError:  # an int of more digits than Python converts to text
        return "(a number too long to show)"
    return text if len(text) <= limit else text[:limit] + "..."


def from_value_error(exc: ValueError, fields: Iterable[str], default_param: str | None) -> OpenAIError:
    """A 400 for a ValueError of SamplingParams or the engine: their messages start with the field's name."""
    message = quote_bounded(exc, 3 * MAX_QUOTED_CHARS)  # some quote the value they reject
    first_word = message.split(" ", 1)[0].split(".", 1)[0].rstrip(":,")  # "structured_outputs.choice must..."
    param = first_word if first_word in set(fields) else default_param
    return OpenAIError(message, HTTPStatus.BAD_REQUEST, param=param)


# ---- pydantic validation errors ----------------------------------------------------------------------------------

# Pydantic names the member of a union it tried ("list[int]", "str", "TextContentPart", "function-after[...]") in
# an error's location; those are not part of the request's path.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|[A-Z]\w*)$|[\[\]-]")


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> OpenAIError:
    """A 400 for pydantic errors (wrong types, missing fields, malformed JSON), naming the first bad parameter."""
    if not errors:
        return OpenAIError("Invalid request body", HTTPStatus.BAD_REQUEST)
    first = errors[0]
    if first.get("type") == "json_invalid":
        return _invalid_json(str(first.get("msg", "")))
    path = _request_path(first.get("loc", ()))
    if not path:  # the body itself: e.g. a JSON array or string instead of an object
        return OpenAIError(f"The request body must be a JSON object: {first.get('msg')}", HTTPStatus.BAD_REQUEST)
    union = _union_summary(errors, first)
    return OpenAIError(union or _describe(first), HTTPStatus.BAD_REQUEST, param=quote_bounded(path[0]))


def _invalid_json(message: str) -> OpenAIError:
    # The JSON parser stops at a fixed depth (about 200) instead of recursing until the stack runs out.
    if "recursion limit" in message:
        return nesting_too_deep()
    return OpenAIError(f"The request body is not valid JSON: {quote_bounded(message)}", HTTPStatus.BAD_REQUEST,
                       code="invalid_json")


def nesting_too_deep() -> OpenAIError:
    return OpenAIError("The request body is nested too deeply: JSON arrays and objects may nest about 200 levels",
                       HTTPStatus.BAD_REQUEST, code="nesting_too_deep")


def _union_summary(errors: Sequence[dict[str, Any]], first: dict[str, Any]) -> str | None:
    """One message for a value that matched no member of a union: which types were expected, plus the first
    error inside a member it partly matched."""
    prefix, _ = _split_at_tag(first.get("loc", ()))
    if prefix is None:
        return None
    tags, deeper = [], None
    for error in errors:
        error_prefix, rest = _split_at_tag(error.get("loc", ()))
        if error_prefix != prefix:
            continue
        if rest[0] not in tags:
            tags.append(rest[0])
        if deeper is None and len(rest) > 1:
            deeper = error
    where = _path_text(prefix)
    message = f"{where}: invalid value; expected {' or '.join(str(t) for t in tags)}"
    return message + (f" ({_describe(deeper)})" if deeper is not None else "")


def _split_at_tag(loc: Sequence[Any]) -> tuple[tuple[Any, ...] | None, tuple[Any, ...]]:
    for position, part in enumerate(loc):
        if isinstance(part, str) and _UNION_TAG.search(part):
            return tuple(loc[:position]), tuple(loc[position:])
    return None, ()


def _request_path(loc: Sequence[Any]) -> list[str | int]:
    # FastAPI prefixes its locations with "body"; our own parsing does not.
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    return [p for p in parts if isinstance(p, int) or not _UNION_TAG.search(str(p))]


def _path_text(loc: Sequence[Any]) -> str:
    # A path can hold a client's dict keys (e.g. of logit_bias): bounded like any other quoted input.
    return quote_bounded(".".join(str(p) for p in _request_path(loc)))


def _describe(error: dict[str, Any]) -> str:
    path = _path_text(error.get("loc", ()))
    # Some messages embed the input value (a validator's ValueError): quote a bounded prefix only.
    message = quote_bounded(error.get("msg", "invalid value"), 2 * MAX_QUOTED_CHARS)
    if error.get("type") == "missing":
        return f"{path}: this field is required"
    if error.get("type") == "extra_forbidden":
        return f"{path}: unknown field"
    return f"{path}: {message}"
