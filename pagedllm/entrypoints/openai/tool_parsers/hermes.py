"""``hermes``: free text with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen
2.5 / 3 and most models whose chat template writes tools that way)."""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import DeltaMessage
from pagedllm.entrypoints.openai.tool_parsers.base import (
    CallObject,
    ContentBeforeTag,
    DeltaWriter,
    ParsedToolCall,
    ToolCallParser,
    call_prefix,
    json_call,
    tag_prefix_length,
)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_PREFIX = call_prefix("arguments|parameters")
_ARGUMENT_KEYS = ("arguments", "parameters")


class HermesCallsParser(ToolCallParser):
    """Free text with ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks.

    Content is the text outside the blocks (see ``ContentBeforeTag``). A block whose body is not name-first JSON
    is read whole, then parsed; one that does not parse at all is given back as content, and
    ``has_invalid_call`` is set (a whole text with such a block is all content: see ``parse``)."""

    def __init__(self) -> None:
        super().__init__()
        self._state = "content"  # "content", "call" (in a block's body), "after_call" (skip to the end tag)
        self._content = ContentBeforeTag(TOOL_CALL_START)
        self._end_held = ""  # after a call: what may be the start of the end tag
        self._call: CallObject | None = None
        self.has_invalid_call = False

    def feed(self, text: str) -> list[DeltaMessage]:
        out = DeltaWriter()
        while text:
            text = {"content": self._in_content, "call": self._in_call, "after_call": self._after_call}[
                self._state](text, out)
        return out.messages

    def finish(self) -> list[DeltaMessage]:
        out = DeltaWriter()
        if self._state == "call" and self._call.call is None:  # an unclosed block whose name never showed
            self._close_unread_block(self._call.pending, out, closed=False)
        self._content.finish(out, has_calls=bool(self.calls))
        return out.messages

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """As streamed, except that a text with a block that is not a call is all content, with no calls."""
        content, calls = super().parse(text)
        if self.has_invalid_call:
            return text, []
        return content, calls

    def _in_content(self, text: str, out: DeltaWriter) -> str:
        rest = self._content.feed(text, out)
        if rest is None:
            return ""
        self._state = "call"
        self._call = CallObject(_PREFIX, len(self.calls))
        return rest

    def _in_call(self, text: str, out: DeltaWriter) -> str:
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

    def _after_call(self, text: str, out: DeltaWriter) -> str:
        text = self._end_held + text
        end = text.find(TOOL_CALL_END)
        if end < 0:
            # the call object's closing brace and whitespace are skipped; what may start the end tag is kept
            self._end_held = text[len(text) - tag_prefix_length(text, TOOL_CALL_END):]
            return ""
        self._end_held = ""
        self._state = "content"
        return text[end + len(TOOL_CALL_END):]

    def _close_unread_block(self, body: str, out: DeltaWriter, closed: bool) -> None:
        """A whole block body that did not start name-first: a call if it is such JSON, else content."""
        call = json_call(body, _ARGUMENT_KEYS)
        if call is None:
            self.has_invalid_call = True
            self._content.write(TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""), out)
            return
        out.whole_call(len(self.calls), call)
        self.calls.append(call)
