"""A minimal OpenAI-compatible streaming server for testing ``bench serve``: ``GET /v1/models`` and streaming
``POST /v1/completions`` (SSE chunks, one per token, then a usage chunk and ``[DONE]``), on 127.0.0.1 in a thread."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL_NAME = "fake-model"


class FakeOpenAIServer:
    """Serves until ``close()``; ``requests`` holds every completion payload received. Requests whose
    ``max_tokens`` is in ``fail_max_tokens`` are answered with HTTP 500."""

    def __init__(self, token_delay_s: float = 0.001, fail_max_tokens: frozenset[int] = frozenset()) -> None:
        self.token_delay_s = token_delay_s
        self.fail_max_tokens = fail_max_tokens
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    self._send_json(404, {"error": {"message": "not found"}})
                    return
                self._send_json(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                if self.path != "/v1/completions":
                    self._send_json(404, {"error": {"message": "not found"}})
                    return
                if body["max_tokens"] in server.fail_max_tokens:
                    self._send_json(500, {"error": {"message": "injected failure"}})
                    return
                self._stream(body)

            def _stream(self, body: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                num_tokens = body["max_tokens"]
                for index in range(num_tokens):
                    time.sleep(server.token_delay_s)
                    finish = "length" if index == num_tokens - 1 else None
                    self._event({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                 "choices": [{"index": 0, "text": f" t{index}", "finish_reason": finish}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    prompt = body["prompt"]
                    prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
                    self._event({"id": "cmpl-1", "object": "text_completion", "choices": [],
                                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": num_tokens,
                                           "total_tokens": prompt_tokens + num_tokens}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, data: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            def _send_json(self, status: int, data: dict[str, Any]) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler
