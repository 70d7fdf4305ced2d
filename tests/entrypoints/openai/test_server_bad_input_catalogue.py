"""Issue 13's bad-input catalogue, through a real server process: every case (sizes, types, ranges, encodings,
content types, nesting, grammars, tools, roles, limits, models, methods, auth) answers its own 4xx in OpenAI's
error shape, with a message that quotes only a bounded prefix of the input; afterwards the server still answers a
normal request, and no request is left running or waiting, nor a KV block in use.

The server is this module's own (small body limit, so size cases stay cheap); the expected statuses are the
issue's contract, not whatever the server answers today.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.entrypoints.openai.conftest import API_KEY, ENGINE_FLAGS, RemoteServer
from tests.entrypoints.openai.isolation_checks import (
    assert_openai_error,
    assert_server_idle,
    assert_serves_a_normal_request,
)

MAX_BODY_BYTES = 256 * 1024
USER = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "the quick brown fox " * 400  # far beyond the 1024-token context
DEEP = 100_000  # nesting depth of the nested-JSON cases (their bodies stay under MAX_BODY_BYTES)
JSON = "application/json"


@dataclass(frozen=True)
class Case:
    """One bad request and the answer it must get. ``body``: a dict/list sent as JSON, bytes sent raw, or None
    for no body. ``param``: the field ``error.param`` must name (only checked when ``check_param``)."""

    name: str
    path: str
    body: Any
    status: int
    param: str | None = None
    check_param: bool = True
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    authorized: bool = True


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hi", "max_tokens": 4, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, "max_tokens": 4, **fields}


def tool(name: str = "get_weather") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def nested_schema_body(depth: int) -> bytes:
    """A completion whose JSON schema nests ``depth`` objects (built as text). 60 levels: past the depth a schema may
    have, within the depth a request body may have, so the schema check is the one that answers."""
    schema = b'{"type": "object", "properties": {"a": ' * depth + b'{"type": "string"}' + b"}}" * depth
    return b'{"model": "tiny", "prompt": "hi", "max_tokens": 4, "structured_outputs": {"json": ' + schema + b"}}"


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


SIZES = [
    Case("body-over-limit", "/v1/completions", raw(completion(prompt="x" * (MAX_BODY_BYTES + 1024))), 413,
         check_param=False),
    Case("body-over-limit-chunked", "/v1/completions", raw(completion(prompt="x" * (MAX_BODY_BYTES + 1024))), 413,
         check_param=False, chunked=True),
    Case("tokenize-body-over-limit", "/tokenize", raw({"prompt": "y" * (MAX_BODY_BYTES + 1024)}), 413,
         check_param=False),
    Case("prompt-beyond-context", "/v1/completions", completion(prompt=LONG_PROMPT), 400, "prompt"),
    Case("chat-prompt-beyond-context", "/v1/chat/completions",
         chat(messages=[{"role": "user", "content": LONG_PROMPT}]), 400, "messages"),
    Case("max-tokens-beyond-context", "/v1/completions", completion(max_tokens=5000), 400, "max_tokens"),
    Case("many-out-of-vocab-ids", "/v1/completions", completion(prompt=[100_000 + i for i in range(20_000)]), 400,
         "prompt"),
    Case("huge-model-name", "/v1/completions", completion(model="m" * 100_000), 404, "model"),
    Case("stop-string-too-long", "/v1/completions", completion(stop=["s" * 2000]), 400, "stop"),
]

LIMITS = [
    Case("n-over-max-n", "/v1/completions", completion(n=17, temperature=1.0), 400, "n"),
    Case("chat-n-over-max-n", "/v1/chat/completions", chat(n=17, temperature=1.0), 400, "n"),
    Case("best-of-over-max-n", "/v1/completions", completion(n=1, best_of=17, temperature=1.0), 400, "best_of"),
    Case("beam-width-over-max-n", "/v1/completions", completion(use_beam_search=True, n=17), 400, "n"),
    Case("huge-beam-width", "/v1/completions", completion(use_beam_search=True, n=16384), 400, "n"),
    Case("too-many-prompts", "/v1/completions", completion(prompt=["hi"] * 65), 400, "prompt"),
    Case("too-many-token-prompts", "/v1/completions", completion(prompt=[[5, 6]] * 65), 400, "prompt"),
    Case("too-many-stop-strings", "/v1/completions", completion(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    Case("too-many-stop-token-ids", "/v1/completions", completion(stop_token_ids=[5] * 1025), 400,
         "stop_token_ids"),
    Case("too-many-logit-bias", "/v1/completions", completion(logit_bias={str(i): 1.0 for i in range(1025)}), 400,
         "logit_bias"),
    Case("too-many-tools", "/v1/chat/completions", chat(tools=[tool(f"f{i}") for i in range(129)]), 400, "tools"),
    Case("logprobs-over-max", "/v1/completions", completion(logprobs=21), 400, "logprobs"),
    Case("top-logprobs-over-20", "/v1/chat/completions", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    Case("prompt-logprobs-over-20", "/v1/completions", completion(prompt_logprobs=21), 400, "prompt_logprobs"),
]

TYPES = [
    Case("prompt-int", "/v1/completions", completion(prompt=123), 400, "prompt"),
    Case("prompt-dict", "/v1/completions", completion(prompt={"text": "hi"}), 400, "prompt"),
    Case("max-tokens-string", "/v1/completions", completion(max_tokens="ten"), 400, "max_tokens"),
    Case("max-tokens-float", "/v1/completions", completion(max_tokens=4.5), 400, "max_tokens"),
    Case("temperature-string", "/v1/completions", completion(temperature="hot"), 400, "temperature"),
    Case("stream-string", "/v1/completions", completion(stream="yes"), 400, "stream"),
    Case("n-float", "/v1/completions", completion(n=1.5), 400, "n"),
    Case("seed-string", "/v1/completions", completion(seed="42"), 400, "seed"),
    Case("stop-int", "/v1/completions", completion(stop=7), 400, "stop"),
    Case("logit-bias-list", "/v1/completions", completion(logit_bias=[1, 2]), 400, "logit_bias"),
    Case("logit-bias-key-not-int", "/v1/completions", completion(logit_bias={"x": 1}), 400, "logit_bias"),
    Case("messages-string", "/v1/chat/completions", chat(messages="hi"), 400, "messages"),
    Case("content-int", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    Case("return-token-ids-string", "/v1/completions", completion(return_token_ids="yes"), 400, "return_token_ids"),
    Case("body-json-array", "/v1/completions", [1, 2, 3], 400, check_param=False),
    Case("body-json-string", "/v1/chat/completions", "hello", 400, check_param=False),
    Case("body-json-null", "/v1/completions", b"null", 400, check_param=False),
    Case("body-empty", "/v1/completions", b"", 400, check_param=False),
    Case("body-malformed", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, check_param=False),
    Case("body-trailing-garbage", "/v1/completions", raw(completion()) + b"}}", 400, check_param=False),
]

RANGES = [
    Case("top-k-beyond-int64", "/v1/completions", completion(top_k=9223372036854775808), 400, "top_k"),
    Case("top-k-below-minus-one", "/v1/completions", completion(top_k=-2), 400, "top_k"),
    Case("seed-2-pow-64", "/v1/completions", completion(seed=2**64), 400, "seed"),
    Case("seed-below-int64", "/v1/completions", completion(seed=-(2**63) - 1), 400, "seed"),
    Case("min-tokens-beyond-int64", "/v1/completions", completion(min_tokens=2**63), 400, "min_tokens"),
    Case("max-tokens-beyond-int64", "/v1/completions", completion(max_tokens=2**64), 400, "max_tokens"),
    Case("temperature-negative", "/v1/completions", completion(temperature=-0.5), 400, "temperature"),
    Case("top-p-zero", "/v1/completions", completion(top_p=0), 400, "top_p"),
    Case("top-p-above-one", "/v1/chat/completions", chat(top_p=1.5), 400, "top_p"),
    Case("min-p-above-one", "/v1/completions", completion(min_p=1.5), 400, "min_p"),
    Case("n-zero", "/v1/completions", completion(n=0), 400, "n"),
    Case("max-tokens-negative", "/v1/completions", completion(max_tokens=-1), 400, "max_tokens"),
    Case("repetition-penalty-zero", "/v1/completions", completion(repetition_penalty=0), 400, "repetition_penalty"),
    Case("presence-penalty-3", "/v1/completions", completion(presence_penalty=3), 400, "presence_penalty"),
    Case("frequency-penalty-minus-3", "/v1/completions", completion(frequency_penalty=-3), 400, "frequency_penalty"),
    Case("logit-bias-beyond-float32", "/v1/completions", completion(logit_bias={"5": 1e39}), 400, "logit_bias"),
    Case("logit-bias-key-beyond-int64", "/v1/completions", completion(logit_bias={str(2**64): 1}), 400,
         "logit_bias"),
    Case("stop-token-id-negative", "/v1/completions", completion(stop_token_ids=[-1]), 400, "stop_token_ids"),
    Case("stop-token-id-beyond-int64", "/v1/completions", completion(stop_token_ids=[2**63]), 400, "stop_token_ids"),
    Case("prompt-token-id-huge", "/v1/completions", completion(prompt=[5, 2**70]), 400, "prompt"),
    Case("prompt-token-id-negative", "/v1/completions", completion(prompt=[[5, -1]]), 400, "prompt"),
    Case("detokenize-huge-id", "/detokenize", {"tokens": [1, 2**64]}, 400, "tokens"),
    Case("detokenize-negative-id", "/detokenize", {"tokens": [-5]}, 400, "tokens"),
    Case("temperature-nan", "/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400,
         check_param=False),
    Case("top-p-infinity", "/v1/completions", b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}', 400,
         check_param=False),
    Case("presence-penalty-minus-infinity", "/v1/chat/completions",
         b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": -Infinity}', 400,
         check_param=False),
    Case("logit-bias-nan", "/v1/completions", b'{"model": "tiny", "prompt": "hi", "logit_bias": {"5": NaN}}', 400,
         check_param=False),
    Case("length-penalty-nan", "/v1/completions",
         b'{"model": "tiny", "prompt": "hi", "use_beam_search": true, "n": 2, "length_penalty": NaN}', 400,
         check_param=False),
]

ENCODINGS = [
    Case("invalid-utf8", "/v1/completions", b'{"model": "tiny", "prompt": "caf\xc3\x28 \xff\xfe"}', 400,
         check_param=False),
    Case("utf16-body", "/v1/completions", json.dumps(completion()).encode("utf-16"), 400, check_param=False,
         headers={"Content-Type": "application/json; charset=utf-16"}),
    Case("utf16-body-plain-json-type", "/v1/chat/completions", json.dumps(chat()).encode("utf-16-le"), 400,
         check_param=False),
    Case("lone-surrogate", "/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', 400, check_param=False),
    Case("truncated-utf8-in-key", "/v1/completions", b'{"mod\xe2\x82": "tiny", "prompt": "hi"}', 400,
         check_param=False),
]

CONTENT_TYPES = [
    Case("form-urlencoded", "/v1/completions", raw(completion()), 415, check_param=False,
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("text-plain", "/v1/chat/completions", raw(chat()), 415, check_param=False,
         headers={"Content-Type": "text/plain"}),
    Case("multipart", "/v1/completions", raw(completion()), 415, check_param=False,
         headers={"Content-Type": "multipart/form-data; boundary=x"}),
    Case("no-content-type", "/v1/completions", raw(completion()), 415, check_param=False,
         headers={"Content-Type": ""}),
    Case("json-lookalike", "/v1/completions", raw(completion()), 415, check_param=False,
         headers={"Content-Type": "application/jsonp"}),
    Case("tokenize-text-plain", "/tokenize", raw({"model": "tiny", "prompt": "hi"}), 415, check_param=False,
         headers={"Content-Type": "text/plain"}),
    Case("detokenize-form", "/detokenize", raw({"model": "tiny", "tokens": [1]}), 415, check_param=False,
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
]

NESTING = [
    Case("deep-array-body", "/v1/completions", b"[" * DEEP + b"]" * DEEP, 400, check_param=False),
    Case("deep-object-in-field", "/v1/completions",
         b'{"model": "tiny", "prompt": "hi", "extra": ' + b'{"a":' * (DEEP // 4) + b"1" + b"}" * (DEEP // 4) + b"}",
         400,
         check_param=False),
    Case("tokenize-deep-array", "/tokenize", b'{"prompt": "hi", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400,
         check_param=False),
    Case("deep-chat-template-kwargs", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"a": '
         + b"[" * DEEP + b"]" * DEEP + b"}}", 400, check_param=False),
    Case("deep-schema-object", "/v1/completions", nested_schema_body(60), 400,
         "structured_outputs"),
    Case("deep-schema-as-string", "/v1/completions",
         completion(structured_outputs={"json": '{"a": ' * 20_000 + "1" + "}" * 20_000}), 400, "structured_outputs"),
]

GRAMMARS = [
    Case("invalid-regex", "/v1/completions", completion(structured_outputs={"regex": "(ab"}), 400,
         "structured_outputs"),
    Case("invalid-json-schema", "/v1/completions", completion(structured_outputs={"json": {"type": "nonsense"}}), 400,
         "structured_outputs"),
    Case("schema-not-json-text", "/v1/completions", completion(structured_outputs={"json": "{not json"}), 400,
         "structured_outputs"),
    Case("invalid-ebnf", "/v1/completions", completion(structured_outputs={"grammar": "root ::= ( unclosed"}), 400,
         "structured_outputs"),
    Case("empty-choice", "/v1/completions", completion(structured_outputs={"choice": []}), 400, "structured_outputs"),
    Case("two-constraints", "/v1/completions", completion(structured_outputs={"regex": "a+", "choice": ["a"]}), 400,
         "structured_outputs"),
    Case("unknown-constraint", "/v1/completions", completion(structured_outputs={"xml": "<a/>"}), 400,
         "structured_outputs"),
    Case("response-format-unknown-type", "/v1/chat/completions", chat(response_format={"type": "xml"}), 400,
         "response_format"),
    Case("json-schema-without-schema", "/v1/chat/completions",
         chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "response_format"),
    Case("grammar-with-beam-search", "/v1/completions",
         completion(use_beam_search=True, n=2, structured_outputs={"choice": ["a", "b"]}), 400, "structured_outputs"),
    Case("guided-regex-invalid", "/v1/completions", completion(guided_regex="(ab"), 400, "guided_regex"),
    Case("guided-choice-not-list", "/v1/completions", completion(guided_choice="yes"), 400, "guided_choice"),
    Case("guided-json-and-regex", "/v1/completions", completion(guided_json={"type": "string"}, guided_regex="a+"),
         400, check_param=False),
]

TOOLS = [
    Case("tool-without-function", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools"),
    Case("tool-function-without-name", "/v1/chat/completions",
         chat(tools=[{"type": "function", "function": {"parameters": {}}}]), 400, "tools"),
    Case("tools-not-a-list", "/v1/chat/completions", chat(tools={"type": "function"}), 400, "tools"),
    Case("tool-choice-unknown-function", "/v1/chat/completions",
         chat(tools=[tool()], tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "tool_choice"),
    Case("tool-choice-bogus-string", "/v1/chat/completions", chat(tools=[tool()], tool_choice="sometimes"), 400,
         "tool_choice"),
]

ROLES = [
    Case("unknown-role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
         "messages"),
    Case("missing-role", "/v1/chat/completions", chat(messages=[{"content": "hi"}]), 400, "messages"),
    Case("empty-messages", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    Case("image-content", "/v1/chat/completions",
         chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
         "messages"),
    Case("tokenize-unknown-role", "/tokenize", {"messages": [{"role": "root", "content": "hi"}]}, 400, "messages"),
]

REQUESTS = [
    Case("missing-prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    Case("empty-prompt", "/v1/completions", completion(prompt=""), 400, "prompt"),
    Case("empty-prompt-list", "/v1/completions", completion(prompt=[]), 400, "prompt"),
    Case("unknown-model", "/v1/completions", completion(model="gpt-17"), 404, "model"),
    Case("chat-unknown-model", "/v1/chat/completions", chat(model="gpt-17"), 404, "model"),
    Case("stream-options-without-stream", "/v1/completions", completion(stream_options={"include_usage": True}), 400,
         "stream_options"),
    Case("suffix", "/v1/completions", completion(suffix="bye"), 400, "suffix"),
    Case("tokenize-missing-prompt", "/tokenize", {"text": "hi"}, 400, "prompt"),
    Case("get-completions", "/v1/completions", None, 405, check_param=False, method="GET"),
    Case("put-chat", "/v1/chat/completions", chat(), 405, check_param=False, method="PUT"),
    Case("delete-models", "/v1/models", None, 405, check_param=False, method="DELETE"),
    Case("get-tokenize", "/tokenize", None, 405, check_param=False, method="GET"),
    Case("unknown-route", "/v1/audio/transcriptions", {"input": "hi"}, 404, check_param=False),
    Case("missing-api-key", "/v1/completions", completion(), 401, check_param=False, authorized=False),
    Case("tokenize-without-api-key", "/tokenize", {"prompt": "hi"}, 401, check_param=False, authorized=False),
    Case("detokenize-without-api-key", "/detokenize", {"tokens": [5]}, 401, check_param=False, authorized=False),
    Case("wrong-api-key", "/v1/chat/completions", chat(), 401, check_param=False,
         headers={"Authorization": "Bearer not-the-key"}),
]

CATALOGUE = SIZES + LIMITS + TYPES + RANGES + ENCODINGS + CONTENT_TYPES + NESTING + GRAMMARS + TOOLS + ROLES + REQUESTS
assert len({case.name for case in CATALOGUE}) == len(CATALOGUE), "case names must be unique"


@pytest.fixture(scope="module")
def server(server_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    """This module's own server (named ``server`` so that a failure shows its log): an API key and a small body
    limit, so that the size cases stay cheap."""
    remote = RemoteServer(server_model_dir, [*ENGINE_FLAGS, "--served-model-name", "tiny",
                                             "--max-request-body-bytes", str(MAX_BODY_BYTES)],
                          tmp_path_factory.mktemp("catalogue_logs"), api_key=API_KEY)
    yield remote
    remote.terminate()


@pytest.fixture(scope="module")
def session(server: RemoteServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def send(session: httpx.Client, server: RemoteServer, case: Case) -> httpx.Response:
    """Send ``case`` as written: JSON bodies with ``application/json`` unless the case says otherwise."""
    headers = {**(server.headers if case.authorized else {}), **case.headers}
    if isinstance(case.body, bytes):
        content = case.body
    elif case.body is None:
        content = None
    else:
        content = json.dumps(case.body).encode()
    if content is not None:
        headers.setdefault("Content-Type", JSON)
        if case.chunked:  # a generator has no length: httpx sends it with Transfer-Encoding: chunked
            body = content
            content = (body[start:start + 16384] for start in range(0, len(body), 16384))
    request = session.build_request(case.method, case.path, content=content, headers=headers)
    if headers.get("Content-Type") == "":
        del request.headers["Content-Type"]
    return session.send(request)


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.name for case in CATALOGUE])
def test_bad_input_gets_its_4xx_in_openai_shape(server, session, case):
    response = send(session, server, case)
    assert_openai_error(response, case.status, case.param, case.check_param)


def test_catalogue_has_at_least_60_cases():
    assert len(CATALOGUE) >= 60


def test_server_serves_and_is_idle_after_the_catalogue(server, session):
    """Runs after the cases (module order): nothing they sent is left running, waiting or holding KV blocks."""
    session.headers.update(server.headers)
    assert session.get("/health").status_code == 200
    assert_serves_a_normal_request(session)
    assert_server_idle(server)
    log = server.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 2000:][:6000]
