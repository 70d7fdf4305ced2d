"""The app's options, in process (no lifespan, so the shared engine outlives each app): CORS, the API key from
PAGEDLLM_API_KEY, --chat-template; and its routes' dependencies (none runs in a thread)."""

from __future__ import annotations

import fastapi.dependencies.utils
from fastapi.testclient import TestClient

from pagedllm.entrypoints.openai.server import build_app
from tests.entrypoints.openai.conftest import serve_args

AUTH = {"Authorization": "Bearer k"}
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}


def test_cors_is_off_unless_origins_are_allowed(engine):
    closed = TestClient(build_app(engine, serve_args()))
    assert "access-control-allow-origin" not in closed.options("/v1/completions", headers=PREFLIGHT).headers
    opened = TestClient(build_app(engine, serve_args("--allowed-origins", "https://app.example,https://b.example")))
    response = opened.options("/v1/completions", headers=PREFLIGHT)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    other = opened.options("/v1/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_api_key_from_the_environment(engine, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_API_KEY", "env-key")
    client = TestClient(build_app(engine, serve_args()))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer env-key"}).status_code == 200
    assert client.get("/health").status_code == 200  # only /v1 routes are protected
    flag_wins = TestClient(build_app(engine, serve_args("--api-key", "flag-key")))
    assert flag_wins.get("/v1/models", headers={"Authorization": "Bearer env-key"}).status_code == 401


def test_chat_template_file_replaces_the_tokenizers(engine, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    client = TestClient(build_app(engine, serve_args("--chat-template", str(template))))
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "The quick fox"}]
    tokens = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
    text = client.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text == "[system] Be brief.\n[user] The quick fox\n"
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(tokens)


def test_template_errors_are_a_400(engine, tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    client = TestClient(build_app(engine, serve_args("--chat-template", str(template))))
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages" and "user first" in response.json()["error"]["message"]


def test_no_dependency_runs_in_a_thread(engine, monkeypatch):
    """FastAPI runs a plain ``def`` dependency in its thread pool: a thread hop (and GIL hand-over) per request.
    The generation routes' dependencies (API key, generation served) are coroutine functions."""
    hops = []

    async def counting_run_in_threadpool(call, *args, **kwargs):
        hops.append(call)
        return call(*args, **kwargs)

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", counting_run_in_threadpool)
    client = TestClient(build_app(engine, serve_args("--api-key", "k")))
    body = {"model": client.get("/v1/models", headers=AUTH).json()["data"][0]["id"], "max_tokens": 2}
    for path, extra in (("/v1/completions", {"prompt": "hello"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        assert client.post(path, json={**body, **extra}, headers=AUTH).status_code == 200
    assert hops == []
