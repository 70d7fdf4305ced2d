"""Data parallelism inside a server of several models: a models-file entry with ``data_parallel_size: 2`` is two
engine core processes behind one served name (the model pool's pieces, reused): metrics with both the model_name
and the engine label, the admin status listing both cores, and one core killed leaving the model serving (/health
names it, /ready stays 200). One server for the module."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.entrypoints.openai.conftest import ENGINE_FLAGS, RemoteServer

pytestmark = pytest.mark.slow  # two engine core processes start (~30 s on 2 busy cores)


@pytest.fixture(scope="module")
def server(server_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    config = tmp_path_factory.mktemp("dp_models") / "models.yaml"
    config.write_text(f"models:\n  - model: {server_model_dir}\n    served_model_name: tiny\n"
                      "    data_parallel_size: 2\n    cpu_threads: 1\n")
    remote = RemoteServer(None, ["--models-config", str(config), *ENGINE_FLAGS], tmp_path_factory.mktemp("logs"))
    yield remote
    remote.terminate()


def _complete(server: RemoteServer, prompt: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    return httpx.post(server.url_for("/v1/completions"), json=body, timeout=60)


def test_a_data_parallel_model_in_a_models_file(server):
    for prompt in ("a b", "c d", "e f", "g h"):  # under one KV block: no affinity key
        assert _complete(server, prompt).status_code == 200  # one at a time: ties take turns
    text = httpx.get(server.url_for("/metrics"), timeout=10).text
    finished = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pagedllm:request_success_total":
                assert sample.labels["model_name"] == "tiny"
                finished[sample.labels["engine"]] = finished.get(sample.labels["engine"], 0) + sample.value
    assert finished == {"0": 2, "1": 2}
    (status,) = httpx.get(server.url_for("/v1/admin/models"), timeout=10).json()["data"]
    assert len(status["core_pids"]) == 2 and status["core_pid"] == status["core_pids"][0]

    os.kill(status["core_pids"][1], signal.SIGKILL)
    health = None
    for _ in range(100):
        health = httpx.get(server.url_for("/health"), timeout=10)
        if health.status_code == 503:
            break
    assert health.status_code == 503 and "tiny: engine 1 of 2" in health.json()["error"]["message"]
    assert httpx.get(server.url_for("/ready"), timeout=10).status_code == 200
    for prompt in ("The quick brown fox", "Once upon a time"):
        assert _complete(server, prompt).status_code == 200
    (status,) = httpx.get(server.url_for("/v1/admin/models"), timeout=10).json()["data"]
    assert status["state"] == "serving"
