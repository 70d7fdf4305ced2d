"""The incremental tool-call and reasoning parsers, without a server: whatever way the text is split into deltas,
a stream gives the same content (and reasoning) and exactly the same call names and arguments as the whole text;
malformed calls fall back to content."""

from __future__ import annotations

import json
import random

import pytest

from pagedllm.entrypoints.openai.chat_output import OutputFormat
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.reasoning_parsers import make_reasoning_parser
from pagedllm.entrypoints.openai.tool_calls import parse_hermes_tool_calls, plan_tools
from pagedllm.entrypoints.openai.tool_parsers import (
    TOOL_CALL_PARSERS,
    HermesCallsParser,
    NamedCallParser,
    RequiredCallsParser,
    make_tool_call_parser,
)

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


# ---- the formats of --tool-call-parser ------------------------------------------------------------------------------

# (format, text, expected content, expected [(name, arguments as a JSON value)])
FAMILY_CASES = [
    ("hermes", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Checking.", [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Pa;ris}"}}; {"name": "f", "parameters": {}}',
     None, [("get_weather", {"city": "Pa;ris}"}), ("f", {})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "arguments": {"x": [1, {"y": "}"}]}}', None, [("f", {"x": [1, {"y": "}"}]})]),
    ("llama3_json", '\n {"parameters": {"a": 1}, "name": "g"}', None, [("g", {"a": 1})]),  # not name-first: whole
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}\n\nDone.', "\n\nDone.", [("f", {"a": 1})]),
    ("llama3_json", 'The answer is {"name": "f"}', 'The answer is {"name": "f"}', []),  # calls come first or not
    ("llama3_json", '{"city": "Paris"} is JSON, not a call', '{"city": "Paris"} is JSON, not a call', []),
    ("llama3_json", "{not json at all", "{not json at all", []),
    ("llama3_json", "  plain text\n", "  plain text\n", []),
    ("mistral", 'Sure.\n[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "f", "arguments": {"s": "a]b,\\"c"}}]', "Sure.",
     [("get_weather", {"city": "Paris"}), ("f", {"s": 'a]b,"c'})]),
    ("mistral", '[TOOL_CALLS] {"name": "f", "arguments": {"a": 1}}', None, [("f", {"a": 1})]),
    ("mistral", '[TOOL_CALLS][{"arguments": {"a": 1}, "name": "f"}]', None, [("f", {"a": 1})]),
    ("mistral", '[TOOL_CALLS][{"x": 1}]', '[TOOL_CALLS][{"x": 1}]', []),  # not a call: content
    ("mistral", "x [TOOL_CALLS] no list", "x [TOOL_CALLS] no list", []),
    ("mistral", "a [TOOL_CA", "a [TOOL_CA", []),
    ("pythonic", '[get_weather(city="Paris"), f(x=1, y=[1, "],)"], z={"k": None})]', None,
     [("get_weather", {"city": "Paris"}), ("f", {"x": 1, "y": [1, "],)"], "z": {"k": None}})]),
    ("pythonic", "<|python_start|>[a.b(q='it\\'s', t=True)]<|python_end|>", None, [("a.b", {"q": "it's", "t": True})]),
    ("pythonic", "[f(x=1)] and then text", " and then text", [("f", {"x": 1})]),
    ("pythonic", "hello [f(x=1)]", "hello [f(x=1)]", []),
    ("pythonic", "[f(1)]", "[f(1)]", []),  # positional arguments: not a call
    ("pythonic", "[f(x={1, 2})]", "[f(x={1, 2})]", []),  # a set is not JSON
    ("pythonic", "[f(x=open('/etc/passwd'))]", "[f(x=open('/etc/passwd'))]", []),  # only literals: nothing runs
    ("pythonic", "[f(x=1), g(y=", ", g(y=", [("f", {"x": 1})]),  # cut short: the unfinished call is content
    ("pythonic", "[]", "[]", []),
]


@pytest.mark.parametrize("family, text, content, calls", FAMILY_CASES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(FAMILY_CASES)])
def test_family_parsers_stream_equals_whole(family, text, content, calls):
    whole_content, whole_calls = make_tool_call_parser(family).parse(text)
    assert whole_content == content
    assert [(call.name, json.loads(call.arguments)) for call in whole_calls] == calls
    for seed in range(25):
        streamed_content, streamed_calls, _ = _stream(make_tool_call_parser(family), text, seed)
        assert streamed_content == (content if calls else text or None)
        assert streamed_calls == [(call.name, call.arguments) for call in whole_calls]


def test_json_formats_stream_arguments_as_they_are_written():
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius", "days": 3}}'
    _, calls, num_deltas = _stream(make_tool_call_parser("llama3_json"), text, 0)
    assert num_deltas > 10 and calls[0][1] == '{"city": "Paris", "unit": "celsius", "days": 3}'  # as written


def test_mistral_call_ids_are_nine_letters_and_digits():
    """Mistral's chat templates refuse tool_call_id values of another shape when the calls come back."""
    _, calls = make_tool_call_parser("mistral").parse('[TOOL_CALLS][{"name": "f", "arguments": {}}]')
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    assert make_tool_call_parser("mistral").needs_special_tokens  # [TOOL_CALLS] is a special token
    assert not make_tool_call_parser("hermes").needs_special_tokens


def test_unknown_tool_call_parser():
    with pytest.raises(ValueError, match="hermes"):
        make_tool_call_parser("nope")
    assert set(TOOL_CALL_PARSERS) == {"hermes", "llama3_json", "mistral", "pythonic"}


def test_auto_tool_choice_needs_a_format():
    assert plan_tools(TOOLS, "auto", auto_parser="pythonic").stream_parser().__class__.__name__ == \
        "PythonicCallsParser"
    for tool_choice in ("auto", None):  # tools without tool_choice mean "auto"
        with pytest.raises(OpenAIError, match="--enable-auto-tool-choice") as info:
            plan_tools(TOOLS, tool_choice, auto_parser=None)
        assert info.value.param == "tool_choice"
    assert plan_tools(TOOLS, "none", auto_parser=None).mode == "none"
    assert plan_tools(TOOLS, "required", auto_parser=None).mode == "required"


# ---- reasoning ------------------------------------------------------------------------------------------------------

# (parser, prompt, chat_template_kwargs, text, expected reasoning, expected content)
REASONING_CASES = [
    ("qwen3", "<|im_start|>assistant\n", None, "<think>\nLet me see.\n</think>\n\nIt is 4.", "\nLet me see.\n",
     "\n\nIt is 4."),
    ("qwen3", "<|im_start|>assistant\n", None, "It is 4, no thinking.", None, "It is 4, no thinking."),
    ("qwen3", "<|im_start|>assistant\n", None, " <think>cut short by max_tokens </thi", "cut short by max_tokens </thi",
     None),
    ("qwen3", "<|im_start|>assistant\n<think>\n", None, "Opened by the template.</think>Answer.",
     "Opened by the template.", "Answer."),
    ("qwen3", "<|im_start|>assistant\n", None, "a <think> later is content", None, "a <think> later is content"),
    ("deepseek_r1", "<｜Assistant｜><think>\n", None, "Thinking...</think>\n\nAnswer.", "Thinking...", "\n\nAnswer."),
    ("deepseek_r1", "<｜Assistant｜>", None, "<think>\nThinking...</think>Answer.", "\nThinking...", "Answer."),
    ("deepseek_r1", "<｜Assistant｜>", None, "Still thinking when cut", "Still thinking when cut", None),
    ("deepseek_r1", "<｜Assistant｜>", None, "</think>", None, None),
]


def _stream_reasoning(parser, text: str, seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    reasoning, content, start = "", "", 0
    while start < len(text):
        size = rng.randint(1, 5)
        delta = parser.feed(text[start:start + size])
        reasoning, content, start = reasoning + delta.reasoning, content + delta.content, start + size
    last = parser.finish()
    return reasoning + last.reasoning, content + last.content


@pytest.mark.parametrize("name, prompt, kwargs, text, reasoning, content", REASONING_CASES)
def test_reasoning_stream_equals_whole(name, prompt, kwargs, text, reasoning, content):
    assert make_reasoning_parser(name, prompt, kwargs).parse(text) == (reasoning, content)
    for seed in range(25):
        assert _stream_reasoning(make_reasoning_parser(name, prompt, kwargs), text, seed) == (reasoning or "",
                                                                                              content or "")


def test_reasoning_turned_off():
    assert make_reasoning_parser("qwen3", "x", {"enable_thinking": False}) is None
    assert make_reasoning_parser("qwen3", "x", {"enable_thinking": True}) is not None
    assert make_reasoning_parser("deepseek_r1", "<｜Assistant｜><think>\n\n</think>\n\n") is None  # closed by the template
    # A grammar from the first token leaves no room to think: only an explicit <think> is reasoning.
    constrained = make_reasoning_parser("deepseek_r1", "<｜Assistant｜><think>\n", constrained=True)
    assert constrained.parse('{"a": 1}') == (None, '{"a": 1}')
    with pytest.raises(ValueError, match="qwen3"):
        make_reasoning_parser("nope", "")


def test_tool_calls_are_read_after_reasoning():
    """A mention of <tool_call> while thinking is reasoning; the calls come from the content after it, streamed in
    any split as whole."""
    text = ('<think>I could write <tool_call> here.</think>\n\nChecking.\n<tool_call>\n'
            '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    fmt = OutputFormat(plan_tools(TOOLS, "auto"), "qwen3", "<|im_start|>assistant\n")
    read = fmt.read_whole(text)
    assert read.reasoning == "I could write <tool_call> here." and read.content == "\n\nChecking."
    assert [(call.name, json.loads(call.arguments)) for call in read.calls] == [("get_time", {"zone": "CET"})]
    for seed in range(25):
        stream, rng, deltas, start = fmt.choice_stream(), random.Random(seed), [], 0
        while start < len(text):
            size = rng.randint(1, 6)
            deltas += stream.deltas(text[start:start + size], finished=start + size >= len(text))
            start += size
        assert "".join(delta.reasoning_content or "" for delta in deltas) == read.reasoning
        assert "".join(delta.content or "" for delta in deltas) == read.content
        assert [(call.name, call.arguments) for call in stream.calls] == [(c.name, c.arguments) for c in read.calls]
        assert not any(delta.reasoning_content and (delta.content or delta.tool_calls) for delta in deltas)
    hidden = OutputFormat(plan_tools(TOOLS, "auto"), "qwen3", "", include_reasoning=False)
    assert hidden.read_whole(text).reasoning is None and hidden.read_whole(text).content == "\n\nChecking."
