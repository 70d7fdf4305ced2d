"""``pagedllm chat``: a small interactive client for a running OpenAI-compatible server (pagedllm's or any other).

Standard library only (urllib + a line-based SSE reader), so it works wherever pagedllm installs. Ctrl-C during a
reply cancels it (the connection closes, so the server aborts the request) and returns to the prompt; Ctrl-D or
``/exit`` leaves.
"""

from __future__ import annotations

import contextlib
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

DEFAULT_CHAT_MAX_TOKENS = 512  # a reply's bound: a chat answer fits, and a CPU server ends it within a minute or so


class ChatClientError(RuntimeError):
    """The server could not be reached or answered with an error."""


@dataclass(frozen=True)
class ReplyDelta:
    """One streamed piece of a reply: its text, and why the reply ended once it has ("stop", "length"...)."""

    content: str = ""
    finish_reason: str | None = None


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

    def stream_chat(self, model: str, messages: list[dict[str, str]], **params: Any) -> Iterator[ReplyDelta]:
        """The reply's pieces as the server streams them. Closing the iterator early closes the connection, which
        makes the server abort the request."""
        body = {"model": model, "messages": messages, "stream": True, **params}
        with self._open("POST", "/chat/completions", body) as response:
            for raw_line in response:
                line = raw_line.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                yield from _deltas(json.loads(data))

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


def _deltas(chunk: dict[str, Any]) -> Iterator[ReplyDelta]:
    if "error" in chunk:
        raise ChatClientError(chunk["error"].get("message", "stream failed"))
    for choice in chunk.get("choices", []):
        content = choice.get("delta", {}).get("content") or ""
        if content or choice.get("finish_reason"):
            yield ReplyDelta(content, choice.get("finish_reason"))


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except Exception:  # noqa: BLE001 - any unreadable error body: fall back to the status text
        return exc.reason


class ChatSession:
    """One conversation with the server: its history, and a turn at a time streamed to ``stdout``."""

    def __init__(self, client: ChatClient, model: str, system: str | None, params: dict[str, Any],
                 stdout: TextIO) -> None:
        self.client, self.model, self.params, self.stdout = client, model, params, stdout
        self.start = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.start)

    def clear(self) -> None:
        self.messages = list(self.start)

    def turn(self, text: str) -> None:
        """Send ``text``, stream the reply; the turn joins the history only if the reply came back whole or cut
        at the length limit (not after an error or Ctrl-C, which propagates once the connection is closed)."""
        self.messages.append({"role": "user", "content": text})
        try:
            reply, finish_reason = self._stream_reply()
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": reply})
        self.stdout.write("\n" + self._cut_notice() if finish_reason == "length" else "\n")

    def _stream_reply(self) -> tuple[str, str | None]:
        pieces, finish_reason = [], None
        with contextlib.closing(self.client.stream_chat(self.model, self.messages, **self.params)) as deltas:
            for delta in deltas:
                pieces.append(delta.content)
                finish_reason = delta.finish_reason or finish_reason
                self.stdout.write(delta.content)
                self.stdout.flush()
        return "".join(pieces), finish_reason

    def _cut_notice(self) -> str:
        limit = self.params.get("max_tokens")
        said = f"its limit of {limit} tokens (--max-tokens)" if limit else "the server's length limit"
        return f"[reply cut at {said}]\n"


def run_chat(client: ChatClient, model: str | None, system: str | None, params: dict[str, Any],
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Read a user turn per line, stream each reply; ``/clear`` forgets the conversation, ``/exit`` or EOF quits,
    Ctrl-C cancels the reply being streamed (or, at the prompt, the line being typed)."""
    try:
        session = ChatSession(client, model or client.first_model(), system, params, stdout)
    except ChatClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Chatting with {session.model} at {client.base_url} (/clear to start over, Ctrl-C cancels a reply, "
          "/exit or Ctrl-D quits)", file=stdout)
    while (text := _read_turn(stdin, stdout)) is not None:
        if text == "/clear":
            session.clear()
        elif text:
            _answer(session, text, stdout)
    return 0


def _read_turn(stdin: TextIO, stdout: TextIO) -> str | None:
    """The next line the user typed, stripped; None to quit (EOF, ``/exit``, ``/quit``)."""
    while True:
        if stdin.isatty():
            stdout.write("> ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as a shell does
            stdout.write("\n(Ctrl-D or /exit quits)\n")
            continue
        if not line or line.strip() in ("/exit", "/quit"):
            return None
        return line.strip()


def _answer(session: ChatSession, text: str, stdout: TextIO) -> None:
    try:
        session.turn(text)
    except ChatClientError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # the stream is closed by now: the server aborts the request
        stdout.write("\n[reply cancelled]\n")
