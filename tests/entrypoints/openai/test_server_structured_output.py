"""Structured outputs on the server: OpenAI's ``response_format`` (json_object, json_schema) and vLLM's
``structured_outputs`` extra field, on chat and completions, streamed or not; bad specs are 400s naming the field.
The model has random weights: the grammar, not the model, makes the outputs valid."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

USER = [{"role": "user", "content": "Describe a person as JSON."}]

PERSON = {
    "type": "object",
    "properties": {
        # a pattern keeps random-weight strings free of raw control characters (which strict JSON rejects)
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,6}$"},
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "color", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def test_chat_json_schema_outputs_validate(client):
    completion = client.chat.completions.create(model="tiny", messages=USER, n=10, temperature=1.0, seed=7,
                                                max_tokens=120, response_format=PERSON_FORMAT)
    assert len(completion.choices) == 10
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({choice.message.content for choice in completion.choices}) > 1  # sampled, not one forced string


def test_completions_json_schema_outputs_validate(client):
    completion = client.completions.create(model="tiny", prompt="Person:", n=4, temperature=1.0, seed=3,
                                           max_tokens=120, extra_body={"response_format": PERSON_FORMAT})
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.text), PERSON)


def test_json_object_parses(client):
    completion = client.chat.completions.create(model="tiny", messages=USER, n=4, temperature=1.0, seed=11,
                                                max_tokens=200, response_format={"type": "json_object"})
    for choice in completion.choices:
        text = choice.message.content
        if choice.finish_reason == "stop":  # any JSON may be long: only finished ones must parse
            assert isinstance(json.loads(text, strict=False), dict)  # xgrammar admits raw control chars
        else:
            assert text.lstrip().startswith("{")


def test_response_format_text_is_unconstrained(client):
    completion = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, temperature=0,
                                                response_format={"type": "text"}, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 3


def test_structured_outputs_choice_and_regex(client):
    choices = ["yes", "no", "maybe later"]
    completion = client.chat.completions.create(model="tiny", messages=USER, n=6, temperature=1.0, seed=5,
                                                max_tokens=20, extra_body={"structured_outputs": {"choice": choices}})
    for choice in completion.choices:
        assert choice.message.content in choices and choice.finish_reason == "stop"
    pattern = r"[a-z]{2,5}-\d{3}"
    completion = client.completions.create(model="tiny", prompt="Code:", n=6, temperature=1.0, seed=5,
                                           max_tokens=30, extra_body={"structured_outputs": {"regex": pattern}})
    for choice in completion.choices:
        assert re.fullmatch(pattern, choice.text), choice.text


def test_structured_outputs_grammar_and_json(client):
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    completion = client.completions.create(model="tiny", prompt="Sum:", max_tokens=30, temperature=1.0, seed=2,
                                           extra_body={"structured_outputs": {"grammar": grammar}})
    text = completion.choices[0].text
    assert completion.choices[0].finish_reason != "stop" or re.fullmatch(r"\(\d(\+\d)*\)", text), text
    completion = client.completions.create(model="tiny", prompt="Person:", max_tokens=120, temperature=1.0,
                                           seed=2, extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_json_schema_reassembles(client, endpoint):
    if endpoint == "chat":
        stream = client.chat.completions.create(model="tiny", messages=USER, temperature=1.0, seed=9,
                                                max_tokens=120, response_format=PERSON_FORMAT, stream=True)
        pieces, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    else:
        stream = client.completions.create(model="tiny", prompt="Person:", temperature=1.0, seed=9, max_tokens=120,
                                           extra_body={"response_format": PERSON_FORMAT}, stream=True)
        pieces, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.text)
                finish = choice.finish_reason or finish
    assert finish == "stop"
    assert len([p for p in pieces if p]) > 1  # really streamed
    jsonschema.validate(json.loads("".join(pieces)), PERSON)


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD = [
    ("both-given", CHAT, {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
     "structured_outputs"),
    ("unknown-type", CHAT, {"response_format": {"type": "yaml"}}, "response_format"),
    ("json-schema-missing", CHAT, {"response_format": {"type": "json_schema"}}, "response_format"),
    ("json-schema-missing-schema", COMPLETIONS, {"response_format": {"type": "json_schema",
                                                                     "json_schema": {"name": "x"}}},
     "response_format"),
    ("invalid-json-schema", CHAT, {"response_format": {"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ("invalid-json-schema-stream", CHAT, {"stream": True, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}},
     "response_format"),
    ("schema-not-object", CHAT, {"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}},
     "response_format"),
    ("invalid-regex", COMPLETIONS, {"structured_outputs": {"regex": "a("}}, "structured_outputs"),
    ("invalid-regex-stream", COMPLETIONS, {"stream": True, "structured_outputs": {"regex": "[z-a]"}},
     "structured_outputs"),
    ("empty-choice", CHAT, {"structured_outputs": {"choice": []}}, "structured_outputs"),
    ("bad-grammar", COMPLETIONS, {"structured_outputs": {"grammar": "root ::= undefined_rule"}},
     "structured_outputs"),
    ("two-kinds", CHAT, {"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
    ("no-kind", CHAT, {"structured_outputs": {}}, "structured_outputs"),
    ("unknown-kind", COMPLETIONS, {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ("not-an-object", CHAT, {"structured_outputs": "json"}, "structured_outputs"),
    ("beam-search", COMPLETIONS, {"use_beam_search": True, "n": 2, "response_format": {"type": "json_object"}},
     "response_format"),
]


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_specs_are_400s_naming_the_field(http, path, body, param):
    base = {"messages": USER} if path == CHAT else {"prompt": "hi"}
    response = http.post(path, json={**base, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error


def test_openai_client_raises_bad_request_and_server_keeps_serving(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": "a"}}})
    assert info.value.body["param"] == "response_format"
    assert "json_schema.schema" in info.value.body["message"]
    assert httpx.get(server.url_for("/health")).status_code == 200
    completion = client.chat.completions.create(model="tiny", messages=USER, max_tokens=40, temperature=0,
                                                extra_body={"structured_outputs": {"choice": ["ok", "fine"]}})
    assert completion.choices[0].message.content in ("ok", "fine")
    assert server.wait_idle()["pagedllm:num_requests_running"] == 0
