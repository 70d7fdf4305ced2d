"""A real server process on 127.0.0.1 for the OpenAI server tests, and the tiny model it serves.

The server runs as ``python -m pagedllm.entrypoints.cli serve ...`` in a subprocess (logs in a file, so a full pipe
never stalls it) and is shared by the whole session where the tests allow; tests that kill it start their own.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.entrypoints.openai.cli_args import add_serve_args
from tests.entrypoints.conftest import save_bpe_tokenizer
from tests.utils import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[3]
API_KEY = "test-key-0123456789"
MAX_MODEL_LEN = 1024
# Engine flags shared by the test server and by the offline LLM its outputs are compared with.
ENGINE_FLAGS = ["--device", "cpu", "--block-size", "16", "--num-gpu-blocks-override", "2048",
                "--max-model-len", str(MAX_MODEL_LEN)]
ENGINE_KWARGS = {"device": "cpu", "block_size": 16, "num_gpu_blocks_override": 2048, "max_model_len": MAX_MODEL_LEN}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RemoteServer:
    """``pagedllm serve`` in a subprocess; ready once /health answers 200."""

    def __init__(self, model: str | None, args: list[str], log_dir: Path, api_key: str | None = None,
                 startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.api_key = api_key
        command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *([model] if model else []),
                   "--host", "127.0.0.1", "--port", str(self.port), "--disable-access-log", *args]
        if api_key:
            command += ["--api-key", api_key]
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the server's lifetime
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PAGEDLLM_API_KEY", None)
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        self._wait_until_healthy(startup_timeout)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, path: str) -> str:
        return self.base_url + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url_for("/health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server was not healthy within {timeout} s:\n{self.log()}")

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url_for("/v1"), api_key=self.api_key or "none", max_retries=0, **kwargs)

    def async_client(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=self.url_for("/v1"), api_key=self.api_key or "none", max_retries=0,
                                  **kwargs)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples as {name: value} (labels dropped; the first sample of a name wins)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url_for("/metrics"), timeout=10).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values.setdefault(sample.name, sample.value)
        return values

    def wait_idle(self, timeout: float = 5.0) -> dict[str, float]:
        """Wait until no request runs or waits and the KV cache is empty; return the metrics seen then."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.metrics()
            idle = (metrics["pagedllm:num_requests_running"] == 0 and metrics["pagedllm:num_requests_waiting"] == 0
                    and metrics["pagedllm:kv_cache_usage_perc"] == 0)
            if idle or time.monotonic() > deadline:
                return metrics
            time.sleep(0.1)

    def health_until_exit(self, timeout: float = 20.0) -> int | None:
        """The last /health status seen before the server exited (None: it stopped listening first)."""
        status = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                status = httpx.get(self.url_for("/health"), timeout=2).status_code
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return status

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with a trained BPE tokenizer and chat template, with room for long generations."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("server_model"), "llama", vocab_size=320,
                                 max_position_embeddings=MAX_MODEL_LEN)
    save_bpe_tokenizer(model_dir, 300)
    return model_dir


@pytest.fixture(scope="module")
def engine(server_model_dir: str) -> Iterator[AsyncEngine]:
    """The tiny model's engine in this process, for apps built and driven in process (``TestClient``)."""
    engine = AsyncEngine.from_engine_args(EngineArgs(model=server_model_dir, **ENGINE_KWARGS))
    yield engine
    engine.shutdown()


def serve_args(*flags: str) -> argparse.Namespace:
    """``pagedllm serve`` flags, parsed as the command line parses them."""
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(list(flags))


@pytest.fixture(scope="session")
def server(server_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    """One server for every test that leaves it running, with an API key (so every client sends one) and
    tool_choice "auto" reading Hermes-style calls."""
    remote = RemoteServer(server_model_dir, [*ENGINE_FLAGS, "--served-model-name", "tiny", "tiny-alias",
                                             "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                          tmp_path_factory.mktemp("server_logs"), api_key=API_KEY)
    yield remote
    remote.terminate()


@pytest.fixture
def client(server: RemoteServer):
    return server.client()


@pytest.fixture
def http(server: RemoteServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as session:
        yield session


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test that used a server shows the end of the server's log."""
    outcome = yield
    report = outcome.get_result()
    remote = getattr(item, "funcargs", {}).get("server")
    if report.failed and isinstance(remote, RemoteServer):
        report.sections.append(("server log (tail)", remote.log()[-4000:]))
