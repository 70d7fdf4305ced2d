"""Tool calling on ``/v1/chat/completions``: checking ``tools`` and ``tool_choice``, the grammar that enforces
``"required"`` and a named function, and turning generated text into OpenAI ``tool_calls`` (whole or streamed: the
parsers in ``tool_parsers`` read both).

- ``"none"`` (or no tools): plain text, as without tools.
- a named function: the output is constrained to the function's parameters schema; the whole text is the
  arguments of one call.
- ``"required"``: the output is constrained to a JSON array of one or more ``{"name": <one of the functions>,
  "parameters": {...}}`` items (each item's parameters validating against its function's schema), one call per
  item; with ``parallel_tool_calls`` false the array holds exactly one item.
- ``"auto"`` (the default with tools): no constraint; the calls are read out of the text in the format of the
  server's ``--tool-call-parser`` (see ``tool_parsers``), and the text outside them stays the content.
  ``parallel_tool_calls`` is not enforced here: every call the model writes is a call. As in vLLM, a server
  started without ``--enable-auto-tool-choice`` refuses "auto" (a 400): it cannot know the model's format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.tool_parsers import (
    TOOL_CALL_PARSERS,
    HermesCallsParser,
    NamedCallParser,
    ParsedToolCall,
    RequiredCallsParser,
    ToolCallParser,
    make_tool_call_parser,
)
from pagedllm.params import StructuredOutputsParams

__all__ = ["ParsedToolCall", "ToolPlan", "parse_hermes_tool_calls", "plan_tools", "required_schema"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
AUTO_NEEDS_FLAGS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


@dataclass
class ToolPlan:
    """What a request asks of tools: ``mode`` is "none", "auto", "required" or "named" (then ``named`` is the
    function's name); ``functions`` maps each name to its parameters schema, in request order; ``parallel`` is
    ``parallel_tool_calls`` (whether "required" may make more than one call); ``auto_parser`` names the format
    "auto" reads (a key of ``TOOL_CALL_PARSERS``)."""

    mode: str
    functions: dict[str, dict[str, Any]]
    named: str | None = None
    parallel: bool = True
    auto_parser: str = "hermes"

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The grammar that enforces ``required`` or a named function; None for "auto" and "none"."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self.functions[self.named])
        if self.mode == "required":
            return StructuredOutputsParams(json=required_schema(self.functions, self.parallel))
        return None

    def stream_parser(self) -> ToolCallParser | None:
        """A parser of one choice's text into content and tool-call deltas; None for "none" (plain text)."""
        if self.mode == "named":
            return NamedCallParser(self.named)
        if self.mode == "required":
            return RequiredCallsParser()
        if self.mode == "auto":
            return make_tool_call_parser(self.auto_parser)
        return None

    @property
    def needs_special_tokens(self) -> bool:
        """Whether the output must keep special tokens (the format's markers are special tokens)."""
        return self.mode == "auto" and TOOL_CALL_PARSERS[self.auto_parser].needs_special_tokens

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """``(content, tool_calls)`` of a finished generation, read by the same parser as a stream (so a call's
        arguments are the characters a stream sends). A constrained output that does not parse (cut by max_tokens)
        stays content, with no calls."""
        if self.mode == "auto":
            return self.stream_parser().parse(text)
        parser = self.stream_parser()
        if parser is None or not _is_complete_json(text, self.mode):
            return text, []
        parser.parse_all(text)
        return None, parser.calls


def _is_complete_json(text: str, mode: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if mode == "required":
        return isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value)
    return True


def required_schema(functions: dict[str, dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """One or more calls (exactly one unless ``parallel``), each of any of ``functions``:
    ``[{"name": <const>, "parameters": <its schema>}, ...]``. "name" comes first, so a stream knows the function
    before its arguments start."""
    call = {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
         "required": ["name", "parameters"], "additionalProperties": False}
        for name, schema in functions.items()
    ]}
    schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_hermes_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """Hermes-style calls: each ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block is a call; the
    text outside the blocks is the content (trailing whitespace dropped; None when only whitespace). Text without
    calls is given back unchanged; if any block is not such JSON, nothing is parsed: the whole text is the
    content."""
    return HermesCallsParser().parse(text)


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
               parallel_tool_calls: bool = True, auto_parser: str | None = "hermes") -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` (OpenAIError 400 naming the field) and say what to do. ``auto_parser``:
    the format "auto" reads; None refuses "auto" (explicit, or implied by tools without tool_choice)."""
    functions = _check_tools(tools)
    plan = _plan_choice(functions, tool_choice, parallel_tool_calls)
    if plan.mode == "auto":
        if auto_parser is None:
            raise OpenAIError(AUTO_NEEDS_FLAGS, param="tool_choice")
        plan.auto_parser = auto_parser
    return plan


def _check_tools(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Each function's parameters schema by name, in request order; a bad spec is a 400 naming ``tools``."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if tool.get("type") != "function":
            raise OpenAIError(f"{where}.type must be 'function'", param="tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise OpenAIError(f"{where}.function must be an object with a name", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise OpenAIError(f"{where}.function.name must be a string of 1 to 64 letters, digits, '_', '.' or "
                              "'-'", param="tools")
        if name in functions:
            raise OpenAIError(f"{where}: the function name {name!r} is given twice", param="tools")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise OpenAIError(f"{where}.function.description must be a string", param="tools")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = _EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise OpenAIError(f"{where}.function.parameters must be a JSON schema object", param="tools")
        functions[name] = parameters
    return functions


def _plan_choice(functions: dict[str, dict[str, Any]], tool_choice: str | dict[str, Any] | None,
                 parallel_tool_calls: bool) -> ToolPlan:
    if tool_choice is None:
        return ToolPlan("auto" if functions else "none", functions, parallel=parallel_tool_calls)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise OpenAIError(f"tool_choice {tool_choice!r} is not supported; use 'none', 'auto', 'required' or "
                              '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if tool_choice != "none" and not functions:
            raise OpenAIError(f"tool_choice {tool_choice!r} needs a non-empty tools list", param="tool_choice")
        return ToolPlan(tool_choice, functions, parallel=parallel_tool_calls)
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise OpenAIError('tool_choice must be "none", "auto", "required" or '
                          '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    if name not in functions:
        raise OpenAIError(f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
    return ToolPlan("named", functions, named=name, parallel=parallel_tool_calls)
