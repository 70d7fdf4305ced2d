"""Tool calls read out of generated text piece by piece, for streams and whole responses alike.

A parser is fed the text deltas of one choice and returns OpenAI stream deltas: content, then for each call a
first delta with its index, id, type and name (arguments ""), then fragments of its arguments as they are
generated. Whole responses run the same parser over the whole text, so a call's arguments are the same characters
streamed or not (the raw text of the arguments value as the model wrote it, not a re-serialization).

- ``NamedCallParser``: the whole output is the arguments of one call of a known function.
- ``RequiredCallsParser``: a JSON array ``[{"name": ..., "parameters": {...}}, ...]`` (the grammar of
  tool_choice "required"), one call per item.
- ``HermesCallsParser``: free text with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks
  (tool_choice "auto"); the text outside the blocks is content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedllm.entrypoints.openai.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# What may start a JSON value: the lookahead makes a prefix match independent of how the text was split.
_VALUE_START = r"(?=[{\[\"\-0-9tfn])"
_NAME = r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_prefix(arguments_keys: str) -> re.Pattern[str]:
    """``{"name": "<name>", "<key>": `` up to the first character of the arguments value."""
    return re.compile(r"\s*\{\s*" + _NAME + '"(?:' + arguments_keys + r')"\s*:\s*' + _VALUE_START)


_REQUIRED_ITEM_PREFIX = _call_prefix("parameters")
_HERMES_PREFIX = _call_prefix("arguments|parameters")


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON text
    id: str = field(default_factory=tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class _Deltas:
    """The stream deltas one ``feed`` produces; consecutive argument fragments of a call are merged into one."""

    def __init__(self) -> None:
        self.messages: list[DeltaMessage] = []

    def content(self, text: str) -> None:
        if not text:
            return
        last = self.messages[-1] if self.messages else None
        if last is not None and last.content is not None:
            last.content += text
        else:
            self.messages.append(DeltaMessage(content=text))

    def start_call(self, index: int, call: ParsedToolCall) -> None:
        self.messages.append(DeltaMessage(tool_calls=[DeltaToolCall(
            index=index, id=call.id, type="function", function=DeltaFunctionCall(name=call.name, arguments=""))]))

    def arguments(self, index: int, text: str) -> None:
        if not text:
            return
        last = self.messages[-1].tool_calls if self.messages else None
        if last and last[0].index == index and last[0].id is None:
            last[0].function.arguments += text
        else:
            self.messages.append(DeltaMessage(tool_calls=[DeltaToolCall(
                index=index, function=DeltaFunctionCall(arguments=text))]))


class _JsonValueEnd:
    """Finds where one JSON value ends in text fed piece by piece (strings, escapes and nesting tracked; a bare
    number or literal ends at the first delimiter after it)."""

    __slots__ = ("_depth", "_escaped", "_in_scalar", "_in_string")

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._in_scalar = False

    def scan(self, text: str) -> int | None:
        """The offset in ``text`` just past the value's end, or None while the value goes on."""
        for offset, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    if self._depth == 0:
                        return offset + 1
            elif self._in_scalar:
                if char in ",}] \t\r\n":
                    return offset
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return offset + 1
            elif self._depth == 0 and not char.isspace():
                self._in_scalar = True
        return None


class _CallObject:
    """One ``{"name": ..., "<arguments key>": <value>}`` object: a first delta once the name is known, then the
    value's text as argument fragments."""

    def __init__(self, prefix: re.Pattern[str] | None, index: int) -> None:
        self.prefix = prefix  # None when the name is known beforehand (``call`` set by the owner)
        self.index = index
        self.pending = ""  # text before the arguments value starts
        self.call: ParsedToolCall | None = None
        self._value_end = _JsonValueEnd()

    def feed(self, text: str, out: _Deltas) -> str | None:
        """Consume ``text``; once the arguments value has ended, the text after it (else None)."""
        if self.call is None:
            self.pending += text
            match = self.prefix.match(self.pending)
            if match is None:
                return None
            self.call = ParsedToolCall(json.loads(f'"{match.group(1)}"'), "")
            out.start_call(self.index, self.call)
            text, self.pending = self.pending[match.end():], ""
        end = self._value_end.scan(text)
        fragment = text if end is None else text[:end]
        self.call.arguments += fragment
        out.arguments(self.index, fragment)
        return None if end is None else text[end:]


class ToolCallParser:
    """Reads one choice's text as it is generated; ``calls`` holds the calls found so far."""

    def __init__(self) -> None:
        self.calls: list[ParsedToolCall] = []

    def feed(self, text: str) -> list[DeltaMessage]:
        raise NotImplementedError

    def finish(self) -> list[DeltaMessage]:
        """Deltas of text held back until the end (a possible tag, trailing whitespace, an unclosed block)."""
        return []

    def parse_all(self, text: str) -> list[DeltaMessage]:
        return self.feed(text) + self.finish()


class NamedCallParser(ToolCallParser):
    """The whole output is the arguments of one call of ``name`` (whitespace around the value left out)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self._value: _CallObject | None = None
        self._done = False

    def feed(self, text: str) -> list[DeltaMessage]:
        out = _Deltas()
        if self._done:
            return out.messages
        if self._value is None:
            text = text.lstrip()
            if not text:
                return out.messages  # nothing of the value yet: no call announced for an empty output
            self._value = _CallObject(None, 0)
            self._value.call = ParsedToolCall(self._name, "")
            self.calls.append(self._value.call)
            out.start_call(0, self._value.call)
        self._done = self._value.feed(text, out) is not None
        return out.messages


class RequiredCallsParser(ToolCallParser):
    """``[{"name": ..., "parameters": {...}}, ...]``: each item a call, streamed as its parameters are written."""

    def __init__(self) -> None:
        super().__init__()
        self._item: _CallObject | None = None
        self._state = "open"  # "open": before "["; "item": inside an item; "between": after one; "done"

    def feed(self, text: str) -> list[DeltaMessage]:
        out = _Deltas()
        while text and self._state != "done":
            text = self._step(text, out)
        return out.messages

    def _step(self, text: str, out: _Deltas) -> str:
        """Consume part of ``text`` in the current state; the rest."""
        if self._state == "item":
            rest = self._item.feed(text, out)
            if self._item.call is not None and (not self.calls or self.calls[-1] is not self._item.call):
                self.calls.append(self._item.call)
            if rest is None:
                return ""
            self._state = "between"
            return rest
        # Outside items only brackets, commas, the item's closing brace and whitespace occur (grammar-enforced).
        opener = "[" if self._state == "open" else ",]"
        position = next((i for i, char in enumerate(text) if char in opener), None)
        if position is None:
            return ""
        if text[position] == "]":
            self._state = "done"
            return ""
        self._state = "item"
        self._item = _CallObject(_REQUIRED_ITEM_PREFIX, len(self.calls))
        return text[position + 1:]


class HermesCallsParser(ToolCallParser):
    """Free text with ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks.

    Content is the text outside the blocks, streamed as it comes, except what could be the start of a tag (held
    until it is known) and trailing whitespace (held until more text follows; dropped at the end when there are
    calls, so "Let me check.\\n<tool_call>..." gives the content "Let me check."). A block whose body is not
    name-first JSON is read whole, then parsed; one that does not parse at all is given back as content, and
    ``has_invalid_call`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self._state = "content"  # "content", "call" (in a block's body), "after_call" (skip to the end tag)
        self._held = ""  # content that may be the start of a tag
        self._pending_space = ""  # trailing whitespace of the content so far
        self._call: _CallObject | None = None
        self.has_invalid_call = False

    def feed(self, text: str) -> list[DeltaMessage]:
        out = _Deltas()
        while text:
            text = {"content": self._content, "call": self._in_call, "after_call": self._after_call}[self._state](
                text, out)
        return out.messages

    def finish(self) -> list[DeltaMessage]:
        out = _Deltas()
        if self._state == "call" and self._call.call is None:  # an unclosed block whose name never showed
            self._close_unread_block(self._call.pending, out, closed=False)
        elif self._state == "content":
            self._write_content(self._held, out)
        self._held = ""
        if not self.calls:
            out.content(self._pending_space)  # text without calls is given back exactly
        self._pending_space = ""
        return out.messages

    def _content(self, text: str, out: _Deltas) -> str:
        text = self._held + text
        start = text.find(TOOL_CALL_START)
        if start < 0:
            kept = _tag_prefix_length(text, TOOL_CALL_START)
            self._write_content(text[:len(text) - kept], out)
            self._held = text[len(text) - kept:]
            return ""
        self._write_content(text[:start], out)
        self._held = ""
        self._state = "call"
        self._call = _CallObject(_HERMES_PREFIX, len(self.calls))
        return text[start + len(TOOL_CALL_START):]

    def _write_content(self, text: str, out: _Deltas) -> None:
        body = text.rstrip()
        if not body:
            self._pending_space += text
            return
        out.content(self._pending_space + body)
        self._pending_space = text[len(body):]

    def _in_call(self, text: str, out: _Deltas) -> str:
        call = self._call
        if call.call is None:
            # Before the name is known, the end tag may close a body that is not name-first JSON.
            body = call.pending + text
            end = body.find(TOOL_CALL_END)
            if end >= 0 and call.prefix.match(body[:end]) is None:
                self._close_unread_block(body[:end], out, closed=True)
                self._state = "content"
                return body[end + len(TOOL_CALL_END):]
        rest = call.feed(text, out)
        if call.call is not None and call.call not in self.calls:
            self.calls.append(call.call)
        if rest is None:
            return ""
        self._state = "after_call"
        return rest

    def _after_call(self, text: str, out: _Deltas) -> str:
        text = self._held + text
        end = text.find(TOOL_CALL_END)
        if end < 0:
            # the call object's closing brace and whitespace are skipped; what may start the end tag is kept
            self._held = text[len(text) - _tag_prefix_length(text, TOOL_CALL_END):]
            return ""
        self._held = ""
        self._state = "content"
        return text[end + len(TOOL_CALL_END):]

    def _close_unread_block(self, body: str, out: _Deltas, closed: bool) -> None:
        """A whole block body that did not start name-first: a call if it is such JSON, else content."""
        call = _hermes_call(body)
        if call is None:
            self.has_invalid_call = True
            self._write_content(TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""), out)
            return
        out.start_call(len(self.calls), call)
        out.arguments(len(self.calls), call.arguments)
        self.calls.append(call)


def _hermes_call(body: str) -> ParsedToolCall | None:
    try:
        value = json.loads(body)
        name = value["name"]
        arguments = value.get("arguments", value.get("parameters", {}))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ParsedToolCall(name, arguments)


def _tag_prefix_length(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag`` (held back: it may be a tag)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def collect(messages: list[DeltaMessage]) -> str | None:
    """The content of whole deltas (None when there is none)."""
    content = "".join(message.content or "" for message in messages)
    return content or None
