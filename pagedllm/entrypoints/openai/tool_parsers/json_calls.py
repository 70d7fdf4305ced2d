"""Formats that write calls as bare JSON objects, one after another:

- ``llama3_json`` (Llama 3.1-3.3 JSON tool calling, Llama 4 JSON): the output is ``{"name": ...,
  "parameters": {...}}`` (or ``"arguments"``), optionally after ``<|python_tag|>``, several calls separated by
  ``;``. An output that does not start with a call is content.
- ``mistral`` (Mistral, Mixtral, Mistral-Nemo...): content, then ``[TOOL_CALLS]`` and a JSON array of
  ``{"name": ..., "arguments": {...}}`` objects (or one bare object). Call ids are 9 letters and digits, as
  Mistral's chat templates require of the ids sent back.

In both, text after the calls is content; an object that is not a call is given back as content, with whatever
follows it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from pagedllm.entrypoints.openai.protocol import DeltaMessage
from pagedllm.entrypoints.openai.tool_parsers.base import (
    ContentBeforeTag,
    DeltaWriter,
    JsonCallReader,
    ParsedToolCall,
    ToolCallParser,
    call_prefix,
    tool_call_id,
)

PYTHON_TAG = "<|python_tag|>"
MISTRAL_TOOL_CALLS = "[TOOL_CALLS]"
_ARGUMENT_KEYS = ("arguments", "parameters")
_PREFIX = call_prefix("arguments|parameters")


def mistral_call_id() -> str:
    return uuid.uuid4().hex[:9]


class CallList:
    """JSON call objects one after another: separated by ``separator`` (whitespace around it allowed), ended by
    ``closer`` (None: by any text that is not a separator or an object).

    ``feed`` returns None while the list goes on; at its end ``(unread, rest)``: the text read since the last call
    that made no call (e.g. an object that is not a call: the owner gives it back as content) and the text after
    the list. Calls are appended to ``calls``, the owner's list."""

    def __init__(self, calls: list[ParsedToolCall], separator: str, closer: str | None, start_in_object: bool,
                 raw: str = "", new_id: Callable[[], str] = tool_call_id) -> None:
        self.calls = calls
        self._separator = separator
        self._closer = closer
        self._new_id = new_id
        self._num_made = 0
        self._raw = raw  # text read outside objects since the last call (separators, whitespace, an opening tag)
        self._reader: JsonCallReader | None = None
        self._state = "expect"  # "expect" (an object comes next), "object" (in one), "between" (after one)
        self._end: tuple[str, str] | None = None
        if start_in_object:
            self._start_object()

    def feed(self, text: str, out: DeltaWriter) -> tuple[str, str] | None:
        while text and self._end is None:
            text = self._in_object(text, out) if self._state == "object" else self._outside_object(text)
        return self._end

    def finish(self) -> str:
        """The text to give back as content when the output ends inside the list."""
        if self._state == "object" and self._reader.call is None:
            return self._raw + self._reader.text
        return "" if self._num_made else self._raw

    def _start_object(self) -> None:
        self._reader = JsonCallReader(_PREFIX, len(self.calls), _ARGUMENT_KEYS, self._new_id)
        self._state = "object"

    def _in_object(self, text: str, out: DeltaWriter) -> str:
        rest = self._reader.feed(text, out)
        call = self._reader.call
        if call is not None and (not self.calls or self.calls[-1] is not call):
            self.calls.append(call)
            self._num_made += 1
            self._raw = ""
        if rest is None:
            return ""
        if call is None:
            self._end = (self._raw + self._reader.text, rest)
            return ""
        self._state = "between"
        return rest

    def _outside_object(self, text: str) -> str:
        stripped = text.lstrip()
        self._raw += text[:len(text) - len(stripped)]
        if not stripped:
            return ""
        char, after = stripped[0], stripped[1:]
        if self._state == "between" and char == self._separator:
            self._raw += char
            self._state = "expect"
            return after
        if self._state == "expect" and char == "{":
            self._start_object()
            return stripped
        if char == self._closer:
            self._end = ("" if self._num_made else self._raw + char, after)
        else:
            self._end = (self._raw, stripped)  # not part of the list: it ended before this character
        return ""


class Llama3JsonCallsParser(ToolCallParser):
    """``llama3_json``: see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._state = "start"  # "start" (leading whitespace and tag), "calls", "content"
        self._held = ""
        self._list: CallList | None = None

    def feed(self, text: str) -> list[DeltaMessage]:
        out = DeltaWriter()
        if self._state == "start":
            text = self._start(text)
        if self._state == "calls" and text:
            text = self._in_calls(text, out)
        if self._state == "content":
            out.content(text)
        return out.messages

    def finish(self) -> list[DeltaMessage]:
        out = DeltaWriter()
        if self._state == "start":
            out.content(self._held)
        elif self._state == "calls":
            out.content(self._list.finish())
        return out.messages

    def _start(self, text: str) -> str:
        """Hold the output's first characters until they show whether it starts with a call."""
        self._held += text
        body = self._held.lstrip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].lstrip()
        if not body or PYTHON_TAG.startswith(body):
            return ""  # only whitespace or a possible tag so far
        if body[0] == "{":
            self._state = "calls"
            self._list = CallList(self.calls, ";", None, start_in_object=True,
                                  raw=self._held[:len(self._held) - len(body)])
            self._held = ""
            return body
        self._state = "content"
        text, self._held = self._held, ""
        return text

    def _in_calls(self, text: str, out: DeltaWriter) -> str:
        ended = self._list.feed(text, out)
        if ended is None:
            return ""
        unread, rest = ended
        out.content(unread)
        self._state = "content"
        return rest


class MistralCallsParser(ToolCallParser):
    """``mistral``: see the module docstring. ``[TOOL_CALLS]`` is a special token: the output must keep it."""

    needs_special_tokens = True

    def __init__(self) -> None:
        super().__init__()
        self._state = "content"  # "content", "open" (after the tag, before "[" or "{"), "calls"
        self._content = ContentBeforeTag(MISTRAL_TOOL_CALLS)
        self._opening = ""  # the tag and whitespace after it, given back if no list follows
        self._list: CallList | None = None

    def feed(self, text: str) -> list[DeltaMessage]:
        out = DeltaWriter()
        while text:
            text = {"content": self._in_content, "open": self._open, "calls": self._in_calls}[self._state](
                text, out)
        return out.messages

    def finish(self) -> list[DeltaMessage]:
        out = DeltaWriter()
        if self._state == "open":
            self._content.write(self._opening, out)
        elif self._state == "calls":
            self._content.write(self._list.finish(), out)
        self._content.finish(out, has_calls=bool(self.calls))
        return out.messages

    def _in_content(self, text: str, out: DeltaWriter) -> str:
        rest = self._content.feed(text, out)
        if rest is None:
            return ""
        self._state = "open"
        self._opening = MISTRAL_TOOL_CALLS
        return rest

    def _open(self, text: str, out: DeltaWriter) -> str:
        stripped = text.lstrip()
        self._opening += text[:len(text) - len(stripped)]
        if not stripped:
            return ""
        if stripped[0] not in "[{":
            self._content.write(self._opening, out)
            self._state = "content"
            return stripped
        in_object = stripped[0] == "{"
        self._list = CallList(self.calls, ",", None if in_object else "]", start_in_object=in_object,
                              raw=self._opening + ("" if in_object else "["), new_id=mistral_call_id)
        self._state = "calls"
        return stripped if in_object else stripped[1:]

    def _in_calls(self, text: str, out: DeltaWriter) -> str:
        ended = self._list.feed(text, out)
        if ended is None:
            return ""
        unread, rest = ended
        self._content.write(unread, out)
        self._state = "content"
        return rest
