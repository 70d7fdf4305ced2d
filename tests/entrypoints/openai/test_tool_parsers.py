"""The incremental tool-call parsers, without a server: whatever way the text is split into deltas, a stream
gives the same content and exactly the same call names and arguments as the whole text."""

from __future__ import annotations

import json
import random

import pytest

from pagedllm.entrypoints.openai.tool_calls import parse_hermes_tool_calls, plan_tools
from pagedllm.entrypoints.openai.tool_parsers import HermesCallsParser, NamedCallParser, RequiredCallsParser

HERMES_TEXTS = [
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "unit": "celsius", '
     '"days": 2}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'),
    '<tool_call>{"name": "f", "arguments": {"a": [1, {"b": "]}"}]}}</tool_call>\n\nAfter <tool',
    'A <tool_call>{"arguments": {"x": [1, 2]}, "name": "f"}</tool_call> B',  # not name-first: read whole
    'ok <tool_call>{"name": "f", "arguments": {"a": 1}}',  # unclosed last block
    "  plain text, a < sign and <tool but no call\n ",
]
TOOLS = [{"type": "function", "function": {"name": "get_time"}}, {"type": "function", "function": {"name": "g"}}]


def _stream(parser, text: str, seed: int) -> tuple[str | None, list[tuple[str, str]], int]:
    """Feed ``text`` in random pieces of 1-5 characters: (content, [(name, arguments)], number of deltas)."""
    rng = random.Random(seed)
    messages, start = [], 0
    while start < len(text):
        size = rng.randint(1, 5)
        messages += parser.feed(text[start:start + size])
        start += size
    messages += parser.finish()
    calls: dict[int, list[str]] = {}
    for message in messages:
        for delta in message.tool_calls or []:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.function.arguments == ""
                calls[delta.index] = [delta.function.name, ""]
            else:
                calls[delta.index][1] += delta.function.arguments
    content = "".join(message.content or "" for message in messages) or None
    return content, [tuple(call) for call in calls.values()], len(messages)


@pytest.mark.parametrize("text", HERMES_TEXTS)
def test_hermes_stream_equals_whole(text):
    content, calls = parse_hermes_tool_calls(text)
    for seed in range(25):
        streamed_content, streamed_calls, _ = _stream(HermesCallsParser(), text, seed)
        assert streamed_content == content
        assert streamed_calls == [(call.name, call.arguments) for call in calls]


def test_hermes_arguments_stream_in_pieces():
    text = HERMES_TEXTS[0]
    _, _, num_deltas = _stream(HermesCallsParser(), text, 0)
    assert num_deltas > 10
    content, calls = parse_hermes_tool_calls(text)
    assert content == "Let me check." and json.loads(calls[0].arguments)["city"] == 'Pa"ris}'


def test_required_stream_equals_whole():
    text = ('[{"name": "get_time", "parameters": {"zone": "PST"}}, '
            '{"name": "g", "parameters": {"s": "a]b,\\"c", "n": [1, 2]}}]')
    content, calls = plan_tools(TOOLS, "required").parse(text)
    assert content is None and [call.name for call in calls] == ["get_time", "g"]
    assert json.loads(calls[1].arguments) == {"s": 'a]b,"c', "n": [1, 2]}
    for seed in range(25):
        assert _stream(RequiredCallsParser(), text, seed)[:2] == (None, [(c.name, c.arguments) for c in calls])


def test_named_stream_equals_whole():
    text = '{"zone": "UTC", "nested": {"x": "}"}}'
    plan = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    _, (call,) = plan.parse(text)
    for seed in range(10):
        assert _stream(NamedCallParser("get_time"), text, seed)[:2] == (None, [("get_time", call.arguments)])
    assert _stream(NamedCallParser("get_time"), "", 0) == (None, [], 0)  # nothing generated: no call announced
