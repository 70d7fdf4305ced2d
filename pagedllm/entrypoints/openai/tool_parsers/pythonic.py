"""``pythonic`` (Llama 3.2 / 4 pythonic tool calling, and models trained alike): the output is a Python list of
calls with keyword arguments, ``[get_weather(city="Paris"), f(x=1)]``, optionally between ``<|python_start|>``
and ``<|python_end|>``. Each call is read with ``ast`` (nothing is evaluated: only literals are accepted) and its
arguments become a JSON object. A call is streamed when it is complete (first delta with its name, then its
arguments in one fragment). An output that does not start with "[" is content; so is a list item that is not
such a call, with whatever follows it, and the text after the list.
"""

from __future__ import annotations

import ast
import json

from pagedllm.entrypoints.openai.protocol import DeltaMessage
from pagedllm.entrypoints.openai.tool_parsers.base import DeltaWriter, ParsedToolCall, ToolCallParser

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"


class _PythonItems:
    """Splits the items of a Python list fed piece by piece (after its "["): strings and nesting are tracked, so
    a comma or bracket inside them does not split."""

    __slots__ = ("_depth", "_escaped", "_quote", "item")

    def __init__(self) -> None:
        self._depth = 0  # brackets open inside the current item
        self._quote = ""  # the quote of the string we are in, if any
        self._escaped = False
        self.item = ""  # the current item's text so far

    def scan(self, text: str) -> tuple[int, str] | None:
        """Read ``text`` into ``item`` up to the first top-level "," or "]": (its offset, the character), or None."""
        for offset, char in enumerate(text):
            if self._quote:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == self._quote:
                    self._quote = ""
            elif char in "'\"":
                self._quote = char
            elif char in "([{":
                self._depth += 1
            elif char in ")}]" and self._depth:
                self._depth -= 1
            elif char in ",]" and not self._depth:
                self.item += text[:offset]
                return offset, char
        self.item += text
        return None


def python_call(text: str) -> ParsedToolCall | None:
    """``name(key=literal, ...)`` as a call with JSON arguments; None for anything else (positional or ``**``
    arguments, values that are not literals or not JSON: sets, bytes, NaN)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args or any(kw.arg is None for kw in node.keywords):
            return None
        name = _dotted_name(node.func)
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        return None if name is None else ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False,
                                                                          allow_nan=False))
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = _dotted_name(node.value)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


class PythonicCallsParser(ToolCallParser):
    """``pythonic``: see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._state = "start"  # "start" (leading whitespace and tag), "calls", "content"
        self._raw = ""  # text read since the last call, given back as content if no call comes of it
        self._items = _PythonItems()

    def feed(self, text: str) -> list[DeltaMessage]:
        out = DeltaWriter()
        if self._state == "start":
            text = self._start(text)
        while self._state == "calls" and text:
            text = self._in_calls(text, out)
        if self._state == "end":
            text = self._end(text)
        if self._state == "content":
            out.content(text)
        return out.messages

    def finish(self) -> list[DeltaMessage]:
        out = DeltaWriter()
        leftover = self._raw + self._items.item  # the held start, an unfinished call, or a possible end tag
        if not self.calls or leftover.strip(" \t\r\n,"):
            out.content(leftover)
        return out.messages

    def _start(self, text: str) -> str:
        """Hold the output's first characters until they show whether it starts with a list."""
        self._raw += text
        body = self._raw.lstrip()
        if body.startswith(PYTHON_START):
            body = body[len(PYTHON_START):].lstrip()
        if not body or PYTHON_START.startswith(body):
            return ""
        if body[0] == "[":
            self._state = "calls"
            self._raw = self._raw[:len(self._raw) - len(body) + 1]
            return body[1:]
        return self._give_back(self._raw)

    def _in_calls(self, text: str, out: DeltaWriter) -> str:
        found = self._items.scan(text)
        if found is None:
            return ""
        offset, char = found
        item, self._items = self._items.item, _PythonItems()
        if item.strip():
            call = python_call(item)
            if call is None:
                return self._give_back(self._raw + item + text[offset:])
            out.whole_call(len(self.calls), call)
            self.calls.append(call)
            self._raw = ""
        self._raw += char
        if char == "]":
            if not self.calls:
                return self._give_back(self._raw + text[offset + 1:])
            self._state, self._raw = "end", ""
        return text[offset + 1:]

    def _end(self, text: str) -> str:
        """After the list: whitespace and an end tag are dropped; what may start the tag is held."""
        self._raw += text
        body = self._raw.lstrip()
        if body.startswith(PYTHON_END):
            self._state, self._raw = "content", ""
            return body[len(PYTHON_END):]
        if not body or PYTHON_END.startswith(body):
            return ""
        return self._give_back(self._raw)

    def _give_back(self, text: str) -> str:
        """What was read is not calls (or is past them): it goes on as content."""
        self._state = "content"
        self._raw = ""
        return text
