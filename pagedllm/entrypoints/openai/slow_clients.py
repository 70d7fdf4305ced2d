"""A deadline for reading each request, against slow clients ("slowloris").

uvicorn times out only idle keep-alive connections, and any byte received resets that timer: a client that sends
its headers (or body) one byte per second, or connects and sends nothing, holds a connection forever, and enough of
them exhaust the server's sockets. This protocol gives every request ``timeout_s`` from the moment the server
waits for it (connection opened, or previous response sent) until its head and body have been received; a client
still sending then is disconnected. Responses, however long they stream, are not timed.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger("pagedllm.server")


def request_read_deadline_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (h11 or httptools, whichever it picks) with a request-read deadline of ``timeout_s``;
    pass it as ``uvicorn.Config(http=...)``."""

    class RequestReadDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        """Closes the connection when a request is not fully received within ``timeout_s``."""

        _read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_read_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_read_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_read_deadline()
            super().connection_lost(exc)

        def _arm_read_deadline(self) -> None:
            self._disarm_read_deadline()
            self._read_deadline = asyncio.get_running_loop().call_later(timeout_s, self._on_read_deadline)

        def _disarm_read_deadline(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _on_read_deadline(self) -> None:
            self._read_deadline = None
            if self._is_reading_request() and not self.transport.is_closing():
                logger.info("Closing a connection from %s: its request was not received within %g s",
                            _peer(self.client), timeout_s)
                self.transport.close()

        def _is_reading_request(self) -> bool:
            # No request yet, the last one answered (waiting for the next head), or a body still arriving.
            cycle = self.cycle
            return cycle is None or cycle.response_complete or cycle.more_body

    return RequestReadDeadlineProtocol


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown client"
