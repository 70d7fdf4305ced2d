"""Tool calls read out of generated text piece by piece, for streams and whole responses alike.

Usage (one parser per choice; ``base.ToolCallParser`` is the interface)::

    parser = make_tool_call_parser("hermes")
    deltas = parser.feed(text_delta) ...  + parser.finish()   # OpenAI stream deltas (DeltaMessage)
    content, calls = make_tool_call_parser("hermes").parse(whole_text)   # calls: [ParsedToolCall]

The formats of tool_choice "auto" (``--tool-call-parser``, vLLM's names), one module each:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in free text.
- ``llama3_json``: ``{"name": ..., "parameters": {...}}`` objects (optionally after ``<|python_tag|>``), ``;``
  between them.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` after any content.
- ``pythonic``: ``[get_weather(city="Paris"), f(x=1)]``.

And the forced ones, whose text a grammar shapes: ``NamedCallParser`` (a named function's arguments) and
``RequiredCallsParser`` (tool_choice "required").
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import ParsedToolCall, ToolCallParser, collect, tool_call_id
from pagedllm.entrypoints.openai.tool_parsers.forced import NamedCallParser, RequiredCallsParser
from pagedllm.entrypoints.openai.tool_parsers.hermes import HermesCallsParser
from pagedllm.entrypoints.openai.tool_parsers.json_calls import Llama3JsonCallsParser, MistralCallsParser
from pagedllm.entrypoints.openai.tool_parsers.pythonic import PythonicCallsParser

TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesCallsParser,
    "llama3_json": Llama3JsonCallsParser,
    "mistral": MistralCallsParser,
    "pythonic": PythonicCallsParser,
}


def make_tool_call_parser(name: str) -> ToolCallParser:
    """A fresh parser of the format ``name`` (one of ``TOOL_CALL_PARSERS``) for one choice."""
    try:
        return TOOL_CALL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"Unknown tool call parser {name!r}; choose one of {', '.join(TOOL_CALL_PARSERS)}") from None


__all__ = [
    "TOOL_CALL_PARSERS",
    "HermesCallsParser",
    "Llama3JsonCallsParser",
    "MistralCallsParser",
    "NamedCallParser",
    "ParsedToolCall",
    "PythonicCallsParser",
    "RequiredCallsParser",
    "ToolCallParser",
    "collect",
    "make_tool_call_parser",
    "tool_call_id",
]
