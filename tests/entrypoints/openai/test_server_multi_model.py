"""Several models in one server (--models-config): a tiny Llama and a tiny Qwen3, each in its own engine core process,
plus a model that cannot start; routing, aliases, metrics, probes, the admin API, and one core killed. One server
for the module (the kill comes last), and a second one for the short form (--model A --model B)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from tests.entrypoints.conftest import save_bpe_tokenizer
from tests.entrypoints.openai.conftest import ENGINE_FLAGS, ENGINE_KWARGS, MAX_MODEL_LEN, RemoteServer
from tests.utils import build_tiny_model

pytestmark = pytest.mark.slow  # a server (or several) per module: ~30 s on 2 cores; CI runs it with -m slow

ADMIN_KEY = "admin-key-0123456789"
PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground", "It was the best of times"]


def _tiny_model(tmp_path_factory: pytest.TempPathFactory, arch: str) -> str:
    model_dir = build_tiny_model(tmp_path_factory.mktemp(arch), arch, vocab_size=320,
                                 max_position_embeddings=MAX_MODEL_LEN)
    save_bpe_tokenizer(model_dir, 300)
    return model_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"model-a": _tiny_model(tmp_path_factory, "llama"), "model-b": _tiny_model(tmp_path_factory, "qwen3")}


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    config = tmp_path_factory.mktemp("multi") / "models.yaml"
    config.write_text(f"""
models:
  - model: {model_dirs['model-a']}
    served_model_name: [model-a, a-alt]
  - model: {model_dirs['model-b']}
    served_model_name: model-b
    max_num_seqs: 8
  - model: /no/such/model
    served_model_name: broken
aliases:
  chat: {{model-a: 90, model-b: 10}}
""")
    server = RemoteServer(None, ["--models-config", str(config), "--admin-api-key", ADMIN_KEY, *ENGINE_FLAGS],
                          tmp_path_factory.mktemp("multi_logs"))
    yield server
    server.terminate()


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def _complete(server: RemoteServer, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(server.url_for("/v1/completions"), json=body, timeout=60)


def test_two_models_answer_concurrently_with_their_offline_outputs(server, model_dirs):
    async def run_all() -> dict[str, list[str]]:
        async with server.async_client() as client:
            async def one(model: str, prompt: str) -> str:
                response = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                           extra_body={"ignore_eos": True})
                assert response.model == model
                return response.choices[0].text
            jobs = [one(model, prompt) for prompt in PROMPTS for model in model_dirs]
            texts = await asyncio.gather(*jobs)
        return {model: texts[i::len(model_dirs)] for i, model in enumerate(model_dirs)}

    served = asyncio.run(run_all())
    for model, model_dir in model_dirs.items():
        assert served[model] == _offline_texts(model_dir, PROMPTS, max_tokens=12), model
    assert served["model-a"] != served["model-b"]  # two different models really answered


def _offline_texts(model_dir: str, prompts: list[str], max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [output.outputs[0].text for output in LLM(model_dir, **ENGINE_KWARGS).generate(prompts, params,
                                                                                          use_tqdm=False)]


def test_models_lists_the_serving_models_and_the_alias_not_the_failed_one(server):
    ids = [card["id"] for card in httpx.get(server.url_for("/v1/models")).json()["data"]]
    assert ids == ["model-a", "a-alt", "model-b", "chat"]
    assert httpx.get(server.url_for("/v1/models/model-b")).json()["id"] == "model-b"
    assert httpx.get(server.url_for("/v1/models/broken")).status_code == 404


def test_second_served_name_reaches_the_same_model_and_reports_the_first(server):
    assert _complete(server, "a-alt").json()["model"] == "model-a"


def test_tokenize_uses_the_named_models_tokenizer(server):
    for model in ("model-a", "model-b"):
        response = httpx.post(server.url_for("/tokenize"), json={"model": model, "prompt": PROMPTS[0]})
        assert response.status_code == 200 and response.json()["count"] > 0
    assert httpx.post(server.url_for("/tokenize"), json={"model": "nope", "prompt": "x"}).status_code == 404


def test_unknown_model_is_a_404_and_the_failed_one_a_503_with_its_reason(server):
    response = _complete(server, "nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = _complete(server, "broken")
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
    assert "Model broken failed to start" in server.log()


def test_alias_answers_with_the_real_model_and_is_sticky_per_user(server):
    for user in ("alice", "bob", "carol"):
        models = {_complete(server, "chat", user=user).json()["model"] for _ in range(3)}
        assert len(models) == 1 and models <= {"model-a", "model-b"}
    chat = httpx.post(server.url_for("/v1/chat/completions"), timeout=60,
                      json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["model"] in ("model-a", "model-b")
    unsticky = [_complete(server, "chat", max_tokens=1).json()["model"] for _ in range(10)]
    assert unsticky.count("model-a") == 9  # the even sequence: 90/10 holds from the first requests


def test_alias_splits_1000_requests_within_3_percent_of_its_weights(server):
    async def served_by() -> list[str]:
        limit = asyncio.Semaphore(32)  # bounded: the test loads the server, it does not flood it
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            async def one() -> str:
                async with limit:
                    response = await http.post("/v1/completions", json={"model": "chat", "prompt": "hi",
                                                                        "max_tokens": 1})
                    return response.json()["model"]
            return await asyncio.gather(*(one() for _ in range(1000)))

    models = asyncio.run(served_by())
    assert models.count("model-a") / 1000 == pytest.approx(0.9, abs=0.03)
    assert models.count("model-b") / 1000 == pytest.approx(0.1, abs=0.03)


def test_metrics_are_valid_prometheus_with_one_family_per_name_and_a_label_per_model(server):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url_for("/metrics")).text
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names))
    running = next(family for family in families if family.name == "pagedllm:num_requests_running")
    assert {sample.labels["model_name"] for sample in running.samples} == {"model-a", "model-b"}
    tokens = next(family for family in families if family.name == "pagedllm:generation_tokens")
    assert all(sample.value > 0 for sample in tokens.samples if sample.name.endswith("_total"))


def test_health_and_ready_with_a_failed_model(server):
    assert httpx.get(server.url_for("/health")).status_code == 200
    assert httpx.get(server.url_for("/ready")).status_code == 200


def test_admin_api_wants_its_key(server):
    assert httpx.get(server.url_for("/v1/admin/models")).status_code == 401
    assert httpx.post(server.url_for("/v1/admin/models"), json={"model": "x"}).status_code == 401
    assert httpx.delete(server.url_for("/v1/admin/models/model-a")).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx.delete(server.url_for("/v1/admin/models/model-a"), headers=wrong).status_code == 401
    status = httpx.get(server.url_for("/v1/admin/models"), headers=_admin()).json()
    states = {model["id"]: model["state"] for model in status["data"]}
    assert states == {"model-a": "serving", "model-b": "serving", "broken": "failed"}
    assert status["aliases"] == {"chat": {"model-a": 90.0, "model-b": 10.0}}


def test_load_and_unload_a_model_at_run_time(server, model_dirs):
    body = {"model": model_dirs["model-a"], "served_model_name": "model-c", "max_num_seqs": 4}
    response = httpx.post(server.url_for("/v1/admin/models"), json=body, headers=_admin(), timeout=120)
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "serving"
    assert _complete(server, "model-c").json()["choices"][0]["text"] == _complete(server, "model-a").json()[
        "choices"][0]["text"]
    again = httpx.post(server.url_for("/v1/admin/models"), json=body, headers=_admin(), timeout=60)
    assert again.status_code == 409
    bad = httpx.post(server.url_for("/v1/admin/models"), json={"model": "/nowhere", "served_model_name": "x"},
                     headers=_admin(), timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "model_load_failed"

    async def unload_during_a_request() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            long = asyncio.create_task(http.post("/v1/completions", json={
                "model": "model-c", "prompt": PROMPTS[1], "max_tokens": 200, "ignore_eos": True}))
            await asyncio.sleep(0.5)
            unload = await http.delete("/v1/admin/models/model-c", headers=_admin())
            return await long, unload

    finished, unloaded = asyncio.run(unload_during_a_request())
    assert unloaded.status_code == 200 and unloaded.json()["deleted"] is True
    assert finished.status_code == 200 and finished.json()["usage"]["completion_tokens"] == 200  # let finish
    assert _complete(server, "model-c").status_code == 404
    assert httpx.delete(server.url_for("/v1/admin/models/model-c"), headers=_admin()).status_code == 404


def test_killing_one_models_core_process_leaves_the_other_serving(server):
    status = httpx.get(server.url_for("/v1/admin/models"), headers=_admin()).json()
    pid = next(model["core_pid"] for model in status["data"] if model["id"] == "model-b")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _complete(server, "model-b").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    response = _complete(server, "model-b")
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
    assert _complete(server, "model-a").status_code == 200
    assert _complete(server, "chat", user="anyone").json()["model"] == "model-a"  # the alias skips the dead one
    assert httpx.get(server.url_for("/health")).status_code == 503  # a restart is what brings model-b back
    assert httpx.get(server.url_for("/ready")).status_code == 200  # model-a still takes traffic
    assert httpx.get(server.url_for("/metrics")).status_code == 200
    states = {model["id"]: model["state"] for model in
              httpx.get(server.url_for("/v1/admin/models"), headers=_admin()).json()["data"]}
    assert states["model-b"] == "dead" and states["model-a"] == "serving"
    assert server.proc.poll() is None


def test_repeated_model_flags_serve_both_models_each_in_its_own_core(model_dirs, tmp_path):
    flags = ["--model", f"model-a={model_dirs['model-a']}", "--model", model_dirs["model-b"]]
    server = RemoteServer(None, [*flags, "--admin-api-key", ADMIN_KEY, *ENGINE_FLAGS], tmp_path)
    try:
        ids = [card["id"] for card in httpx.get(server.url_for("/v1/models")).json()["data"]]
        assert ids == ["model-a", model_dirs["model-b"]]  # NAME=MODEL names it; a bare MODEL is its own name
        for name, model_dir in zip(ids, model_dirs.values(), strict=True):
            body = _complete(server, name, max_tokens=12, ignore_eos=True).json()
            assert body["model"] == name
            assert body["choices"][0]["text"] == _offline_texts(model_dir, PROMPTS[:1], max_tokens=12)[0], name
        status = httpx.get(server.url_for("/v1/admin/models"), headers=_admin()).json()["data"]
        core_pids = {model["core_pid"] for model in status}
        assert len(core_pids) == 2 and server.proc.pid not in core_pids
    finally:
        server.terminate()
