"""What every tool-call parser is made of: the parser interface, the stream deltas it writes, and readers of JSON
call objects fed piece by piece.

A parser is fed the text deltas of one choice and returns OpenAI stream deltas: content, then for each call a
first delta with its index, id, type and name (arguments ""), then fragments of its arguments as they are
generated. Whole responses run the same parser over the whole text (``ToolCallParser.parse``), so content and a
call's arguments are the same characters streamed or not (for JSON formats, the raw text of the arguments value
as the model wrote it, not a re-serialization).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pagedllm.entrypoints.openai.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall

# What may start a JSON value: the lookahead makes a prefix match independent of how the text was split.
_VALUE_START = r"(?=[{\[\"\-0-9tfn])"
_NAME = r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_prefix(arguments_keys: str) -> re.Pattern[str]:
    """``{"name": "<name>", "<key>": `` up to the first character of the arguments value (``arguments_keys``: a
    regex alternation of the key's names)."""
    return re.compile(r"\s*\{\s*" + _NAME + '"(?:' + arguments_keys + r')"\s*:\s*' + _VALUE_START)


@dataclass
class ParsedToolCall:
    """One call read out of the text: ``arguments`` is a JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class DeltaWriter:
    """The stream deltas one ``feed`` produces; consecutive content, and consecutive argument fragments of a call,
    are merged into one delta."""

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

    def whole_call(self, index: int, call: ParsedToolCall) -> None:
        """A call known all at once: its first delta, then its arguments in one fragment."""
        self.start_call(index, call)
        self.arguments(index, call.arguments)


class ToolCallParser:
    """Reads one choice's text as it is generated; ``calls`` holds the calls found so far.

    Subclasses implement ``feed`` (and ``finish`` if they hold text back). ``needs_special_tokens``: the format's
    markers are special tokens of its model family, so the text must be generated with
    ``skip_special_tokens=False`` for the parser to see them."""

    needs_special_tokens: ClassVar[bool] = False

    def __init__(self) -> None:
        self.calls: list[ParsedToolCall] = []

    def feed(self, text: str) -> list[DeltaMessage]:
        raise NotImplementedError

    def finish(self) -> list[DeltaMessage]:
        """Deltas of text held back until the end (a possible tag, trailing whitespace, an unclosed call)."""
        return []

    def parse_all(self, text: str) -> list[DeltaMessage]:
        return self.feed(text) + self.finish()

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """``(content, calls)`` of a whole text: content is None when only calls (and whitespace) were written;
        text without calls is given back unchanged."""
        messages = self.parse_all(text)
        if not self.calls:
            return text, []
        return collect(messages), self.calls


class JsonValueEnd:
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


class CallObject:
    """One ``{"name": ..., "<arguments key>": <value>}`` object: a first delta once the name is known, then the
    value's text as argument fragments. Stops at the value's end (the object's closing brace is not read)."""

    def __init__(self, prefix: re.Pattern[str] | None, index: int,
                 new_id: Callable[[], str] = tool_call_id) -> None:
        self.prefix = prefix  # None when the name is known beforehand (``call`` set by the owner)
        self.index = index
        self.pending = ""  # text before the arguments value starts
        self.call: ParsedToolCall | None = None
        self._new_id = new_id
        self._value_end = JsonValueEnd()

    def feed(self, text: str, out: DeltaWriter) -> str | None:
        """Consume ``text``; once the arguments value has ended, the text after it (else None)."""
        if self.call is None:
            self.pending += text
            match = self.prefix.match(self.pending)
            if match is None:
                return None
            self.call = ParsedToolCall(json.loads(f'"{match.group(1)}"'), "", self._new_id())
            out.start_call(self.index, self.call)
            text, self.pending = self.pending[match.end():], ""
        end = self._value_end.scan(text)
        fragment = text if end is None else text[:end]
        self.call.arguments += fragment
        out.arguments(self.index, fragment)
        return None if end is None else text[end:]


class JsonCallReader:
    """One whole JSON call object, from its ``{`` to its ``}``, without tags around it: streamed as a
    ``CallObject`` when it is name-first; otherwise read whole and parsed when it closes. After it closes,
    ``call`` is the call, or None when the object was not a call (its text is ``text``)."""

    def __init__(self, prefix: re.Pattern[str], index: int, argument_keys: tuple[str, ...],
                 new_id: Callable[[], str] = tool_call_id) -> None:
        self.text = ""  # the object's text so far
        self._value = CallObject(prefix, index, new_id)
        self._value_done = False
        self._object_end = JsonValueEnd()
        self._argument_keys = argument_keys
        self._new_id = new_id

    @property
    def call(self) -> ParsedToolCall | None:
        return self._value.call

    def feed(self, text: str, out: DeltaWriter) -> str | None:
        """Consume ``text``; once the object has closed, the text after it (else None)."""
        end = self._object_end.scan(text)
        part = text if end is None else text[:end]
        self.text += part
        if not self._value_done:
            self._value_done = self._value.feed(part, out) is not None
        if end is None:
            return None
        if self._value.call is None:
            self._value.call = json_call(self.text, self._argument_keys, self._new_id)
            if self._value.call is not None:
                out.whole_call(self._value.index, self._value.call)
        return text[end:]


def json_call(text: str, argument_keys: tuple[str, ...],
              new_id: Callable[[], str] = tool_call_id) -> ParsedToolCall | None:
    """A call from a whole JSON object ``{"name": ..., <one of argument_keys>: ...}`` in any key order; None if
    ``text`` is not such an object. Arguments given as a string are kept as written; others are serialized."""
    try:
        value = json.loads(text)
        name = value["name"]
        arguments = next((value[key] for key in argument_keys if key in value), {})
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(name, str) or not isinstance(value, dict):
        return None
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ParsedToolCall(name, arguments, new_id())


class ContentBeforeTag:
    """Content streamed as it comes until a tag that starts calls: what may be the start of the tag is held until
    it is known, and trailing whitespace until more content follows (``finish`` drops it when there were calls,
    so "Let me check.\\n<tag>..." gives the content "Let me check.")."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._held = ""  # content that may be the start of the tag
        self._pending_space = ""  # trailing whitespace of the content so far

    def feed(self, text: str, out: DeltaWriter) -> str | None:
        """Write the content of ``text``; the text after the tag once it shows (else None)."""
        text = self._held + text
        start = text.find(self.tag)
        if start < 0:
            kept = tag_prefix_length(text, self.tag)
            self.write(text[:len(text) - kept], out)
            self._held = text[len(text) - kept:]
            return None
        self.write(text[:start], out)
        self._held = ""
        return text[start + len(self.tag):]

    def write(self, text: str, out: DeltaWriter) -> None:
        """Content known not to hold the tag."""
        body = text.rstrip()
        if not body:
            self._pending_space += text
            return
        out.content(self._pending_space + body)
        self._pending_space = text[len(body):]

    def finish(self, out: DeltaWriter, has_calls: bool) -> None:
        self.write(self._held, out)
        self._held = ""
        if not has_calls:
            out.content(self._pending_space)  # text without calls is given back exactly
        self._pending_space = ""


def tag_prefix_length(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag`` (held back: it may be a tag)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def collect(messages: list[DeltaMessage]) -> str | None:
    """The content of whole deltas (None when there is none)."""
    content = "".join(message.content or "" for message in messages)
    return content or None
