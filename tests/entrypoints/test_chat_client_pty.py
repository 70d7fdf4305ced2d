"""``pagedllm chat`` in a terminal (a pty): Ctrl-C mid-reply cancels it (the connection closes) and returns to the
prompt with the history intact; a reply cut at max_tokens says so; Ctrl-D leaves with status 0."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")


class SlowChatServer:
    """Streams chat replies: "forever" (200 pieces, 50 ms apart) unless the last message is "short" (3 pieces,
    finish_reason "length"). Records each request's body, and whether a client hung up mid-reply."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.client_hung_up = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(b'{"data": [{"id": "slow-model"}]}', "application/json")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                short = body["messages"][-1]["content"] == "short"
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self._stream(3 if short else 200)
                except (BrokenPipeError, ConnectionResetError):
                    server.client_hung_up.set()

            def _stream(self, num_pieces: int) -> None:
                for index in range(num_pieces):
                    finish = "length" if index == num_pieces - 1 else None
                    chunk = {"choices": [{"index": 0, "delta": {"content": f"piece{index} "}, "finish_reason": finish}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.05)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _send(self, payload: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler


class Terminal:
    """A child process on a pty: type into it, wait for what it prints."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its stdin, stdout and controlling terminal are the pty
            # Ctrl-C as at a terminal: a test run started as a background job inherits SIGINT ignored, and Python
            # then installs no KeyboardInterrupt handler (the chat's Ctrl-C tests would see nothing happen).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(argv[0], argv)
        self.seen = ""

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """Wait until ``text`` appears after what earlier calls consumed; return what came before it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; the terminal shows:\n{self.seen[-2000:]}")
            self.seen += os.read(self.fd, 4096).decode(errors="replace")
        before, self.seen = self.seen.split(text, 1)
        return before

    def exit_status(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, 9)
        raise AssertionError("the chat client did not exit")


@pytest.fixture
def server():
    server = SlowChatServer()
    yield server
    server.close()


def test_ctrl_c_cancels_the_reply_and_returns_to_the_prompt(server):
    terminal = Terminal([sys.executable, "-m", "pagedllm.entrypoints.cli", "chat", "--url", server.url,
                         "--system", "Be brief."])
    terminal.expect("> ")
    terminal.type("tell me everything\n")
    terminal.expect("piece3 ")  # the reply is streaming
    terminal.type("\x03")  # Ctrl-C
    terminal.expect("[reply cancelled]")
    terminal.expect("> ")
    assert server.client_hung_up.wait(10), "the client kept the connection open"

    terminal.type("short\n")
    printed = terminal.expect("> ")
    assert "piece2" in printed and "[reply cut at its limit of 512 tokens (--max-tokens)]" in printed
    assert "Traceback" not in printed
    # The cancelled turn left no trace in the history; the request carries the system message and the limit.
    assert server.bodies[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "short"}]
    assert server.bodies[-1]["max_tokens"] == 512
    terminal.type("short\n")  # a whole reply (even one cut at the limit) stays in the history
    terminal.expect("> ")
    assert server.bodies[-1]["messages"][2:] == [{"role": "assistant", "content": "piece0 piece1 piece2 "},
                                                 {"role": "user", "content": "short"}]

    terminal.type("\x04")  # Ctrl-D at the prompt
    assert terminal.exit_status() == 0
