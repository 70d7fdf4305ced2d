"""``pagedllm chat``: a small interactive client for a running OpenAI-compatible server (pagedllm's or any other).

Standard library only (urllib + a line-based SSE reader), so it works wherever pagedllm installs.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO


class ChatClientError(RuntimeError):
    """The server could not be reached or answered with an error."""


class ChatClient:
    """Streams chat completions from ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def first_model(self) -> str:
        with self._open("GET", "/models") as response:
            models = json.load(response)["data"]
        if not models:
            raise ChatClientError("The server lists no model")
        return models[0]["id"]

    def stream_chat(self, model: str, messages: list[dict[str, str]], **params: Any) -> Iterator[str]:
        """The reply's text pieces as the server streams them."""
        body = {"model": model, "messages": messages, "stream": True, **params}
        with self._open("POST", "/chat/completions", body) as response:
            for raw_line in response:
                line = raw_line.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatClientError(chunk["error"].get("message", "stream failed"))
                for choice in chunk.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        yield content

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise ChatClientError(f"HTTP {exc.code}: {_error_message(exc)}") from None
        except urllib.error.URLError as exc:
            raise ChatClientError(f"Cannot reach {self.base_url}: {exc.reason}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except Exception:  # noqa: BLE001 - any unreadable error body: fall back to the status text
        return exc.reason


def run_chat(client: ChatClient, model: str | None, system: str | None, params: dict[str, Any],
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Read a user turn per line, stream each reply; ``/clear`` forgets the conversation, ``/exit`` or EOF quits."""
    try:
        model = model or client.first_model()
    except ChatClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    history = [{"role": "system", "content": system}] if system else []
    messages = list(history)
    interactive = stdin.isatty()
    print(f"Chatting with {model} at {client.base_url} (/clear to start over, /exit or Ctrl-D to quit)", file=stdout)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/clear":
            messages = list(history)
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in client.stream_chat(model, messages, **params):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except ChatClientError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            messages.pop()
            continue
        stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
