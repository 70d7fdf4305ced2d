"""Tool calling on ``/v1/chat/completions``: ``tool_choice`` "required" and a named function are enforced with a
grammar (the model has random weights: the grammar makes the arguments valid), streamed or not; "auto" parses
Hermes-style ``<tool_call>`` blocks (unit-tested on a string: a random model does not write them); bad tool specs
are 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from pagedllm.entrypoints.openai.protocol import ChatMessage
from pagedllm.entrypoints.openai.tool_calls import parse_hermes_tool_calls, plan_tools, required_schema

USER = [{"role": "user", "content": "What is the weather in Paris?"}]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def _check_call(call, names=SCHEMAS) -> None:
    assert call.type == "function"
    assert call.id.startswith("call_") and len(call.id) > 10
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_function_arguments_validate(client):
    completion = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, n=8, temperature=1.0, seed=5, max_tokens=150,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert len(completion.choices) == 8
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        _check_call(call)
    assert len({choice.message.tool_calls[0].function.arguments for choice in completion.choices}) > 1
    assert len({choice.message.tool_calls[0].id for choice in completion.choices}) == 8


def test_required_tool_calls_validate(client):
    completion = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", n=8, temperature=1.0, seed=9,
        max_tokens=200)
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        _check_call(call)


def test_streamed_named_tool_call_reassembles(client):
    stream = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, n=2, temperature=1.0, seed=13, max_tokens=150, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls: dict[int, dict] = {}
    finish: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                if delta.id is not None:  # the first delta of a call
                    assert choice.index not in calls
                    assert delta.type == "function" and delta.function.arguments == ""
                    calls[choice.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    calls[choice.index]["arguments"] += delta.function.arguments
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for call in calls.values():
        assert call["name"] == "get_time" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), TIME)
    assert sorted(calls) == [0, 1]


def test_streamed_required_tool_call(client):
    stream = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", temperature=1.0, seed=2, max_tokens=200,
        stream=True)
    name, arguments, finish = None, "", None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    name = delta.function.name
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_tool_choice_none_and_auto_give_text(client):
    for tool_choice in ("none", "auto", None):
        kwargs = {} if tool_choice is None else {"tool_choice": tool_choice}
        completion = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=8,
                                                    temperature=0.0, **kwargs)
        (choice,) = completion.choices
        assert choice.finish_reason in ("stop", "length")
        assert not choice.message.tool_calls
        assert isinstance(choice.message.content, str)


def test_auto_stream_gives_text(client):
    stream = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=8,
                                            temperature=0.0, stream=True)
    text = "".join(choice.delta.content or "" for chunk in stream for choice in chunk.choices)
    plain = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=8, temperature=0.0)
    assert text == plain.choices[0].message.content


def test_tool_messages_in_conversation(client):
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    completion = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4)
    assert completion.choices[0].message.content is not None


@pytest.mark.parametrize("tools, tool_choice, param", [
    ([], "required", "tool_choice"),
    (None, "required", "tool_choice"),
    (None, {"type": "function", "function": {"name": "get_weather"}}, "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, {"type": "function"}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    ([{"type": "function"}], None, "tools"),
    ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}],
     "required", "tools"),
    (["get_weather"], None, "tools"),
])
def test_bad_tool_specs_are_400(client, tools, tool_choice, param):
    body = {"tools": tools} if tools is not None else {}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, extra_body=body)
    assert info.value.body["param"] == param, info.value.body


def test_forced_tool_call_with_response_format_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                       max_tokens=4, response_format={"type": "json_object"})
    assert info.value.body["param"] == "tool_choice"


# ---- parsing, without a server -----------------------------------------------------------------------------------


def test_hermes_parsing():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", '
            '"days": 2}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    content, calls = parse_hermes_tool_calls(text)
    assert content == "Let me check."
    assert [call.name for call in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius", "days": 2}
    assert json.loads(calls[1].arguments) == {"zone": "CET"}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_hermes_parsing_edge_cases():
    assert parse_hermes_tool_calls("just text") == ("just text", [])
    # only a call: no content
    content, calls = parse_hermes_tool_calls('<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert content is None and calls[0].name == "f" and calls[0].arguments == "{}"
    # an unclosed last block still parses
    content, calls = parse_hermes_tool_calls('ok <tool_call>{"name": "f", "arguments": {"a": 1}}')
    assert content == "ok" and json.loads(calls[0].arguments) == {"a": 1}
    # invalid JSON: the whole text stays content
    bad = '<tool_call>{"name": "f", "arguments": </tool_call>'
    assert parse_hermes_tool_calls(bad) == (bad, [])


def test_plans_and_parsing_of_forced_calls():
    plan = plan_tools(TOOLS, None)
    assert plan.mode == "auto" and plan.structured_outputs() is None
    assert plan_tools(None, None).mode == "none"
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert named.structured_outputs().json == TIME
    assert named.parse('{"zone": "UTC"}')[1][0].name == "get_time"
    assert named.parse('{"zone": ')[1] == []  # cut by max_tokens: no call
    required = plan_tools(TOOLS, "required")
    assert required.structured_outputs().json == required_schema(SCHEMAS)
    content, (call,) = required.parse('{"name": "get_time", "parameters": {"zone": "PST"}}')
    assert content is None and call.name == "get_time" and json.loads(call.arguments) == {"zone": "PST"}
    schema = required_schema(SCHEMAS)
    jsonschema.validate({"name": "get_time", "parameters": {"zone": "PST"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "parameters": {"city": "x"}}, schema)


def test_tool_messages_for_the_template():
    message = ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]})
    assert message.to_template_dict()["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    tool = ChatMessage.model_validate({"role": "tool", "tool_call_id": "c", "content": "42"})
    assert tool.to_template_dict() == {"role": "tool", "content": "42", "tool_call_id": "c"}


def test_render_chat_passes_tools_to_the_template():
    from pagedllm.entrypoints.chat_utils import render_chat

    class Tokenizer:
        chat_template = "x"

        def apply_chat_template(self, conversation, **kwargs):
            self.kwargs = kwargs
            return "prompt"

        def encode(self, text, add_special_tokens):
            return [1, 2]

    tokenizer = Tokenizer()
    render_chat(tokenizer, USER, tools=TOOLS)
    assert tokenizer.kwargs["tools"] == TOOLS
    render_chat(tokenizer, USER)
    assert "tools" not in tokenizer.kwargs
