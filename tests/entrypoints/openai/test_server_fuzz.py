"""Issue 13: a bounded schemathesis fuzz run against the server's own ``/openapi.json`` (a real server process):
no request may get a 5xx, and every response must match what the schema documents (status codes, content types,
bodies).

The server documents every route itself (``entrypoints/openai/openapi.py``: request bodies, 200 answers, SSE events,
OpenAI error bodies); ``test_served_schema_documents_request_bodies`` holds it to that. ``narrowed_schema`` only
narrows generation (small ``max_tokens``, served model names, known fields) so that positive examples reach the
engine cheaply.

Bounded for CI on 2 cores: a fixed number of examples per operation (``FUZZ_EXAMPLES``), no hypothesis deadline, no
shrinking, and generation limited to small ``max_tokens`` so that accepted requests stay cheap (the limits
themselves are tested in the catalogue).
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 - after the importorskip

from pagedllm.entrypoints.openai.openapi import ROUTE_DOCS  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

FUZZ_EXAMPLES = int(os.environ.get("PAGEDLLM_FUZZ_EXAMPLES", "40"))  # per operation and generation mode
TINY_VOCAB_IDS = 256  # ids every test model's vocabulary has
MAX_FUZZ_TOKENS = 8  # max_tokens the positive examples may ask for: accepted requests stay cheap on CPU

STREAMING_ROUTES = {path for (path, _), doc in ROUTE_DOCS.items() if doc.streams}  # 200 may be an event stream
REQUEST_COMPONENTS = [model.__name__ for doc in ROUTE_DOCS.values() for model in doc.request_models]


def bound_max_tokens(components: dict[str, Any]) -> None:
    """Positive examples ask for at most MAX_FUZZ_TOKENS tokens (bigger ones are cheap 400s or expensive 200s)."""
    for name in ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest"):
        properties = components[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if field in properties:
                properties[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_FUZZ_TOKENS},
                                               {"type": "null"}]}


def prompts_the_model_takes(components: dict[str, Any]) -> None:
    """Positive completion prompts are non-empty text or ids in the tiny vocabulary (empty prompts and unknown ids
    are 400s the schema cannot express: left to the negative examples and the catalogue). Without this most
    positive examples were such 400s, and whether any reached the engine depended on the generated sequence."""
    components["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": TINY_VOCAB_IDS - 1}, "minItems": 1},
    ]}


def name_served_models(components: dict[str, Any], names: list[str]) -> None:
    """Valid requests name a served model (or none), so that positive examples get past the model check and reach
    the engine; negative examples still send other names."""
    for name in REQUEST_COMPONENTS:
        components[name]["properties"]["model"] = {"anyOf": [{"enum": names}, {"type": "null"}]}


def no_unknown_fields(components: dict[str, Any]) -> None:
    """Valid requests carry only known fields (the server ignores unknown ones; negative examples still send
    them): otherwise nearly every positive example is a pile of random keys around one bad value."""
    for name in REQUEST_COMPONENTS:
        components[name]["additionalProperties"] = False


def narrowed_schema(served: dict[str, Any], model_names: list[str]) -> dict[str, Any]:
    """The served schema, with positive examples kept cheap and on target (the server documents every route itself:
    ``entrypoints/openai/openapi.py``)."""
    spec = copy.deepcopy(served)
    components = spec["components"]["schemas"]
    bound_max_tokens(components)
    prompts_the_model_takes(components)
    name_served_models(components, model_names)
    no_unknown_fields(components)
    name_served_model_ids(spec["paths"], model_names)
    return spec


def name_served_model_ids(paths: dict[str, Any], names: list[str]) -> None:
    """Valid model ids in a path (``GET /v1/models/{model_id}``) are served names, so that positive examples get the
    200 answer and its schema is checked (unknown names get a 404: test_server_flags)."""
    for item in paths.values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "model_id":
                    parameter["schema"] = {"enum": names}


@pytest.fixture(scope="module")
def served_schema(server) -> dict[str, Any]:
    response = httpx.get(server.url_for("/openapi.json"), timeout=30)
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def fuzz_schema(server, served_schema):
    models = httpx.get(server.url_for("/v1/models"), headers=server.headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(narrowed_schema(served_schema, [card["id"] for card in models["data"]]))
    schema.config.update(base_url=server.base_url)
    schema.config.generation.update(max_examples=FUZZ_EXAMPLES, no_shrink=True, deterministic=True,
                                    database="none")
    return schema


def test_served_schema_documents_request_bodies(served_schema):
    """The server publishes the bodies its handlers parse themselves (the fuzz reads them from there)."""
    missing = [f"{method.upper()} {path}" for (path, method), doc in ROUTE_DOCS.items()
               if doc.request_models and "requestBody" not in served_schema["paths"].get(path, {}).get(method, {})]
    assert missing == [], f"/openapi.json has no request body for {missing}"


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Every route of the server, fuzzed one by one (schemathesis' own lazy parametrization does not run on pytest 9).
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"), ("GET", "/health"),
              ("GET", "/ready"), ("GET", "/ping"), ("GET", "/version"), ("GET", "/metrics"),
              ("GET", "/v1/models/{model_id}"), ("POST", "/v1/embeddings")]
MODES = ["positive", "negative"]


def test_every_served_route_is_fuzzed(served_schema):
    served = {(method.upper(), path) for path, item in served_schema["paths"].items() for method in item}
    assert served <= set(OPERATIONS), f"add these routes to OPERATIONS: {sorted(served - set(OPERATIONS))}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_no_5xx_and_responses_match_the_schema(server, fuzz_schema, served_schema, method, path, mode):
    if path not in served_schema["paths"]:
        pytest.fail(f"the server does not serve {path}")
    if mode == "negative" and method == "GET":
        pytest.skip("a GET route has no body, and its one parameter (a model name) takes any string: no invalid "
                    "input to generate")
    operation = fuzz_schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @settings(deadline=None, max_examples=FUZZ_EXAMPLES, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def call_and_validate(case) -> None:
        response = case.call_and_validate(headers=server.headers, checks=CHECKS, timeout=30)
        statuses[response.status_code] += 1

    statuses: Counter[int] = Counter()
    call_and_validate()
    print(f"{method} {path} {mode}: statuses {dict(statuses)}")
    if mode == "positive" and path in STREAMING_ROUTES:  # the fuzz reached the engine, not only the checks
        assert statuses[200] > 0, statuses
