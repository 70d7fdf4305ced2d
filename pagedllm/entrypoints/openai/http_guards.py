"""The server's gate, a pure ASGI middleware in front of every route: bodies over the size limit are a 413 before
they are read (or as soon as a chunked one passes the limit), and a draining server answers new work with a 503
while the requests already in flight finish; it counts those, so shutdown knows when it may stop.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers and breaks streaming responses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from pagedllm.entrypoints.openai.admission import AdmissionControl, is_generation_request
from pagedllm.entrypoints.openai.errors import OpenAIError

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

# Routes that answer from flags and do no work: open to everyone, also while draining.
PROBE_PATHS = frozenset({"/health", "/ready", "/ping", "/version", "/metrics"})


class BodyTooLarge(Exception):
    """A chunked body went past the size limit while the route read it."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.max_bytes = max_bytes


def body_too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(f"The request body is larger than the server's limit of {max_bytes} bytes "
                       "(--max-request-body-bytes)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, code="request_too_large")


def server_draining() -> OpenAIError:
    return OpenAIError("The server is shutting down and takes no new requests", HTTPStatus.SERVICE_UNAVAILABLE,
                       code="server_draining")


class InFlightRequests:
    """How many work requests (not probes) are being served: a draining server waits for this to reach 0."""

    def __init__(self) -> None:
        self.count = 0

    async def wait_until_idle(self, timeout_s: float, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Poll until no request is in flight, ``timeout_s`` passes or ``should_stop()``; True if idle."""
        deadline = time.monotonic() + timeout_s
        while self.count > 0 and time.monotonic() < deadline and not should_stop():
            await asyncio.sleep(0.05)
        return self.count == 0


class RequestGuard:
    """ASGI middleware: body-size limit, draining gate, in-flight count (see the module docstring)."""

    def __init__(self, app: Callable, max_body_bytes: int, is_draining: Callable[[], bool],
                 in_flight: InFlightRequests, admission: AdmissionControl | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.is_draining = is_draining
        self.in_flight = in_flight
        self.admission = admission  # None: every generation request is admitted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            if refusal.code == "server_draining" and self.admission is not None:
                self.admission.record_rejection("draining")
            await send_error(refusal, scope, receive, send)
            return
        admission = self.admission if self.admission is not None and is_generation_request(scope) else None
        if admission is not None and (refusal := admission.try_admit()) is not None:
            await send_error(refusal, scope, receive, send)
            return
        self.in_flight.count += 1
        try:
            await self.app(scope, capped_receive(receive, self.max_body_bytes), send)
        finally:
            self.in_flight.count -= 1
            if admission is not None:
                admission.release()

    def _refusal(self, scope: Scope) -> OpenAIError | None:
        if self.is_draining():
            return server_draining()
        length = declared_length(scope)
        if length is not None and length > self.max_body_bytes:
            return body_too_large(self.max_body_bytes)
        return None


def declared_length(scope: Scope) -> int | None:
    """The Content-Length header as a number; None when absent (chunked) or not a number (the server rejects it)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


def capped_receive(receive: Receive, max_bytes: int) -> Receive:
    """``receive`` that raises BodyTooLarge once the body received so far passes ``max_bytes``."""
    received = 0

    async def receive_capped() -> dict[str, Any]:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise BodyTooLarge(max_bytes)
        return message

    return receive_capped


async def send_error(error: OpenAIError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer with ``error`` and close the connection: the body (if any) is left unread, so the connection cannot
    carry another request."""
    response = error.to_response()
    response.headers["connection"] = "close"
    await response(scope, receive, send)
