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


def _finished_with_calls(choices) -> list:
    """The choices that made their calls. With random weights the "required" array may go on past max_tokens
    (its length is the model's choice): such a choice ends with "length", its text kept as content, no calls."""
    finished = []
    for choice in choices:
        if choice.finish_reason == "length":
            assert choice.message.tool_calls is None and choice.message.content.startswith("[")
            continue
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and choice.message.tool_calls
        finished.append(choice)
    assert len(finished) >= len(choices) - 2, [choice.finish_reason for choice in choices]
    return finished


def test_required_tool_calls_validate(client):
    completion = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", n=8, temperature=1.0, seed=9,
        max_tokens=600)
    num_calls = []
    for choice in _finished_with_calls(completion.choices):
        for call in choice.message.tool_calls:
            _check_call(call)
        num_calls.append(len(choice.message.tool_calls))
    assert max(num_calls) > 1, num_calls  # parallel calls: the grammar lets the array go on


def test_required_with_parallel_tool_calls_false_makes_one_call(client):
    completion = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", n=8, temperature=1.0, seed=9,
        max_tokens=200, parallel_tool_calls=False)
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        _check_call(call)


def _collect_stream(stream) -> tuple[dict[int, str], dict[int, list[dict]], dict[int, str], dict[int, int]]:
    """Per choice: content, calls ({id, name, arguments}), finish reason, and the number of argument fragments.
    Checks the OpenAI shape: a call's first delta carries its id, type, name and empty arguments; later ones
    only argument fragments of a call already announced."""
    content: dict[int, str] = {}
    calls: dict[int, list[dict]] = {}
    finish: dict[int, str] = {}
    fragments: dict[int, int] = {}
    for chunk in stream:
        for choice in chunk.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            for delta in choice.delta.tool_calls or []:
                made = calls.setdefault(choice.index, [])
                if delta.id is not None:  # the first delta of a call
                    assert delta.index == len(made)
                    assert delta.type == "function" and delta.function.arguments == ""
                    made.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
                else:
                    assert delta.function.name is None and delta.index == len(made) - 1
                    made[delta.index]["arguments"] += delta.function.arguments
                    fragments[choice.index] = fragments.get(choice.index, 0) + 1
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return content, calls, finish, fragments


def _calls_of(choice) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in choice.message.tool_calls or []]


def test_streamed_named_tool_call_reassembles(client):
    kwargs = {"model": "tiny", "messages": USER, "tools": TOOLS, "n": 2, "temperature": 1.0, "seed": 13,
              "max_tokens": 150, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    content, calls, finish, fragments = _collect_stream(client.chat.completions.create(stream=True, **kwargs))
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    assert not any(content.values())
    assert all(count > 1 for count in fragments.values()), fragments  # streamed as generated, not at the end
    for (call,) in calls.values():
        assert call["name"] == "get_time" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), TIME)
    whole = client.chat.completions.create(**kwargs)
    for choice in whole.choices:  # the same seed: the same text, so exactly the same arguments
        assert [(call["name"], call["arguments"]) for call in calls[choice.index]] == _calls_of(choice)


def test_streamed_required_tool_calls_match_non_streamed(client):
    kwargs = {"model": "tiny", "messages": USER, "tools": TOOLS, "tool_choice": "required", "n": 4,
              "temperature": 1.0, "seed": 9, "max_tokens": 600}
    content, calls, finish, fragments = _collect_stream(client.chat.completions.create(stream=True, **kwargs))
    whole = client.chat.completions.create(**kwargs)
    finished = _finished_with_calls(whole.choices)
    for choice in finished:
        assert finish[choice.index] == "tool_calls" and not content[choice.index]
        streamed = [(call["name"], call["arguments"]) for call in calls[choice.index]]
        assert streamed == _calls_of(choice)
        assert fragments[choice.index] > len(streamed)  # arguments arrive in several pieces per call
        for name, arguments in streamed:
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    assert max(len(calls[choice.index]) for choice in finished) > 1


# The random model never writes a <tool_call> block by itself: a regex makes it write one, so "auto" parsing of a
# real stream is tested end to end.
HERMES_REGEX = (r'Sure, checking[.]\n<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET|PST)"\}\}'
                r'\n</tool_call>')


def test_streamed_auto_tool_call_from_hermes_text(client):
    kwargs = {"model": "tiny", "messages": USER, "tools": TOOLS, "temperature": 1.0, "seed": 4, "max_tokens": 200,
              "extra_body": {"structured_outputs": {"regex": HERMES_REGEX}}}
    content, calls, finish, fragments = _collect_stream(client.chat.completions.create(stream=True, **kwargs))
    whole = client.chat.completions.create(**kwargs)
    (choice,) = whole.choices
    assert choice.finish_reason == finish[0] == "tool_calls"
    assert choice.message.content == content[0] == "Sure, checking."
    ((name, arguments),) = _calls_of(choice)
    assert [(call["name"], call["arguments"]) for call in calls[0]] == [(name, arguments)]
    assert name == "get_time" and json.loads(arguments)["zone"] in ("UTC", "CET", "PST")
    assert fragments[0] > 1


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
    content, calls = required.parse('[{"name": "get_time", "parameters": {"zone": "PST"}}, '
                                    '{"name": "get_time", "parameters": {"zone": "UTC"}}]')
    assert content is None and [call.name for call in calls] == ["get_time"] * 2
    assert [json.loads(call.arguments) for call in calls] == [{"zone": "PST"}, {"zone": "UTC"}]
    assert required.parse('[{"name": "get_time", "parameters": {"zo')[1] == []  # cut by max_tokens
    schema = required_schema(SCHEMAS)
    one = {"name": "get_time", "parameters": {"zone": "PST"}}
    jsonschema.validate([one, one], schema)
    for bad in ([], [{"name": "get_time", "parameters": {"city": "x"}}], one):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = plan_tools(TOOLS, "required", parallel_tool_calls=False).structured_outputs().json
    jsonschema.validate([one], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([one, one], single)


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
