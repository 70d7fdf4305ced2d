"""Data parallelism through the server (``serve --data-parallel-size 2``): two engine core processes of the tiny model
behind one API server. Greedy outputs equal offline ``LLM.generate`` (one engine); requests spread over both
replicas; requests sharing a long prefix stay on one replica; per-engine metrics; one replica's core killed while a
stream runs on each leaves the other serving. One server for the module (the kill comes last)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedllm import LLM, SamplingParams
from tests.entrypoints.openai.conftest import ENGINE_FLAGS, ENGINE_KWARGS, RemoteServer

# Two engine core processes start (~30 s on 2 busy cores): left out of the default run (CI runs -m slow).
pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground", "It was the best of times",
           "Call me Ishmael", "All happy families", "It is a truth", "Far out in the uncharted"]


@pytest.fixture(scope="module")
def server(server_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    remote = RemoteServer(server_model_dir, [*ENGINE_FLAGS, "--served-model-name", "tiny", "--data-parallel-size", "2",
                                             "--cpu-threads", "1"],
                          tmp_path_factory.mktemp("dp_logs"))
    yield remote
    remote.terminate()


def _per_engine(server: RemoteServer, name: str, **labels: str) -> dict[str, float]:
    """A metric's value per ``engine`` label (samples matching ``labels``, summed)."""
    text = httpx.get(server.url_for("/metrics"), timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                engine = sample.labels["engine"]
                values[engine] = values.get(engine, 0.0) + sample.value
    return values


def _finished(server: RemoteServer) -> dict[str, float]:
    return _per_engine(server, "pagedllm:request_success_total")


def _complete(server: RemoteServer, prompt, max_tokens: int = 4) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(server.url_for("/v1/completions"), json=body, timeout=60)


def test_concurrent_requests_match_offline_and_spread_over_both_engines(server, server_model_dir):
    async def run_all() -> list[str]:
        async with server.async_client() as client:
            async def one(prompt: str) -> str:
                response = await client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                           extra_body={"ignore_eos": True})
                return response.choices[0].text
            return list(await asyncio.gather(*(one(prompt) for prompt in PROMPTS)))

    before = _finished(server)
    served = asyncio.run(run_all())
    llm = LLM(server_model_dir, **ENGINE_KWARGS)
    offline = [output.outputs[0].text for output in
               llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    assert served == offline
    after = _finished(server)
    counts = {engine: after[engine] - before.get(engine, 0.0) for engine in after}
    assert set(counts) == {"0", "1"}
    assert sum(counts.values()) == len(PROMPTS)
    assert counts["0"] > 0 and counts["1"] > 0


def test_requests_sharing_a_long_prefix_land_on_one_engine(server):
    shared = [(7 * index) % 250 + 20 for index in range(80)]  # 5 blocks of 16: the affinity key covers 4
    before = _finished(server)
    for tail in range(6):  # one at a time: equal (zero) load each time
        assert _complete(server, shared + [tail + 3, tail + 40]).status_code == 200
    after = _finished(server)
    counts = {engine: after[engine] - before.get(engine, 0.0) for engine in after}
    assert sorted(counts.values()) == [0, 6]
    engine = next(engine for engine, count in counts.items() if count == 6)
    hits = _per_engine(server, "pagedllm:prefix_cache_hits_total")
    assert hits[engine] >= 5 * 64  # every request after the first reuses at least the 4 shared full blocks


def test_metrics_are_valid_prometheus_with_an_engine_label(server):
    text = httpx.get(server.url_for("/metrics"), timeout=10).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    running = families["pagedllm:num_requests_running"]
    assert {sample.labels["engine"] for sample in running.samples} == {"0", "1"}
    assert all(sample.labels["model_name"] == "tiny" for sample in running.samples)
    assert len(re.findall(r"^# TYPE pagedllm:num_requests_running ", text, re.MULTILINE)) == 1


def test_startup_log_names_the_layout_and_each_engine(server):
    log = server.log()
    assert "Data parallel: 2 engines (layout dp2 x tp1 x pp1)" in log
    assert "Data-parallel engine 0 of 2" in log and "Data-parallel engine 1 of 2" in log


def test_killing_one_engine_fails_its_requests_and_leaves_the_other_serving(server):
    pid = int(re.search(r"Data-parallel engine 1 of 2: core process (\d+)", server.log()).group(1))
    results: dict[int, str] = {}

    def stream(index: int) -> None:  # short prompts (no affinity key): the two streams go to different engines
        body = {"model": "tiny", "prompt": PROMPTS[index], "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", server.url_for("/v1/completions"), json=body, timeout=120) as response:
            results[index] = response.read().decode()

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while sum(_per_engine(server, "pagedllm:num_requests_running").values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    failed = [text for text in results.values() if "Data-parallel engine 1 of 2 died" in text]
    finished = [text for text in results.values() if '"finish_reason":"length"' in text]
    assert len(failed) == 1 and len(finished) == 1, results
    health = httpx.get(server.url_for("/health"), timeout=10)
    assert health.status_code == 503 and "engine 1 of 2" in health.json()["error"]["message"]
    assert httpx.get(server.url_for("/ready"), timeout=10).status_code == 200
    for prompt in PROMPTS[:4]:  # every new request goes to the live engine
        assert _complete(server, prompt).status_code == 200
    assert server.proc.poll() is None
