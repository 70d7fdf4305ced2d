"""Parsers of forced calls, whose text a grammar shapes (tool_choice a named function, or "required")."""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import DeltaMessage
from pagedllm.entrypoints.openai.tool_parsers.base import (
    CallObject,
    DeltaWriter,
    ParsedToolCall,
    ToolCallParser,
    call_prefix,
)

_REQUIRED_ITEM_PREFIX = call_prefix("parameters")


class NamedCallParser(ToolCallParser):
    """The whole output is the arguments of one call of ``name`` (whitespace around the value left out)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self._value: CallObject | None = None
        self._done = False

    def feed(self, text: str) -> list[DeltaMessage]:
        out = DeltaWriter()
        if self._done:
            return out.messages
        if self._value is None:
            text = text.lstrip()
            if not text:
                return out.messages  # nothing of the value yet: no call announced for an empty output
            self._value = CallObject(None, 0)
            self._value.call = ParsedToolCall(self._name, "")
            self.calls.append(self._value.call)
            out.start_call(0, self._value.call)
        self._done = self._value.feed(text, out) is not None
        return out.messages


class RequiredCallsParser(ToolCallParser):
    """``[{"name": ..., "parameters": {...}}, ...]``: each item a call, streamed as its parameters are written."""

    def __init__(self) -> None:
        super().__init__()
        self._item: CallObject | None = None
        self._state = "open"  # "open": before "["; "item": inside an item; "between": after one; "done"

    def feed(self, text: str) -> list[DeltaMessage]:
        out = DeltaWriter()
        while text and self._state != "done":
            text = self._step(text, out)
        return out.messages

    def _step(self, text: str, out: DeltaWriter) -> str:
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
        self._item = CallObject(_REQUIRED_ITEM_PREFIX, len(self.calls))
        return text[position + 1:]
