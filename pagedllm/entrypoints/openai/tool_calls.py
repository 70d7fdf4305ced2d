"""Tool calling on ``/v1/chat/completions``: checking ``tools`` and ``tool_choice``, the grammar that enforces
``"required"`` and a named function, and turning generated text into OpenAI ``tool_calls``.

- ``"none"`` (or no tools): plain text, as without tools.
- a named function: the output is constrained to the function's parameters schema; the whole text is the
  arguments of one call.
- ``"required"``: the output is constrained to ``{"name": <one of the functions>, "parameters": {...}}`` (its
  parameters validating against that function's schema), parsed into one call.
- ``"auto"`` (the default with tools): no constraint; Hermes-style ``<tool_call>{"name", "arguments"}</tool_call>``
  blocks are parsed out of the text, and the text outside them stays the content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.params import StructuredOutputsParams

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# A closed block, or an unclosed last one (the model stopped before writing </tool_call>).
_HERMES_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(?!.*</tool_call>)(.*)\Z", re.DOTALL)
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON text
    id: str = field(default_factory=tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolPlan:
    """What a request asks of tools: ``mode`` is "none", "auto", "required" or "named" (then ``named`` is the
    function's name); ``functions`` maps each name to its parameters schema, in request order."""

    mode: str
    functions: dict[str, dict[str, Any]]
    named: str | None = None

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The grammar that enforces ``required`` or a named function; None for "auto" and "none"."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self.functions[self.named])
        if self.mode == "required":
            return StructuredOutputsParams(json=required_schema(self.functions))
        return None

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """``(content, tool_calls)`` of a finished generation. A constrained output that does not parse (cut by
        max_tokens) stays content, with no calls."""
        if self.mode == "named":
            try:
                json.loads(text)
            except ValueError:
                return text, []
            return None, [ParsedToolCall(self.named, text.strip())]
        if self.mode == "required":
            try:
                value = json.loads(text)
                name, arguments = value["name"], value["parameters"]
            except (ValueError, KeyError, TypeError):
                return text, []
            return None, [ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False))]
        if self.mode == "auto":
            return parse_hermes_tool_calls(text)
        return text, []


def required_schema(functions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One call of any of ``functions``: ``{"name": <const>, "parameters": <its schema>}``."""
    return {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
         "required": ["name", "parameters"], "additionalProperties": False}
        for name, schema in functions.items()
    ]}


def parse_hermes_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """Hermes-style calls: each ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block is a call; the
    text outside the blocks is the content (None when only whitespace). If any block is not such JSON, nothing is
    parsed: the whole text is the content."""
    if "<tool_call>" not in text:
        return text, []
    calls = []
    for match in _HERMES_RE.finditer(text):
        body = (match.group(1) if match.group(1) is not None else match.group(2)).strip()
        try:
            value = json.loads(body)
            name = value["name"]
            arguments = value.get("arguments", value.get("parameters", {}))
        except (ValueError, KeyError, TypeError, AttributeError):
            return text, []
        if not isinstance(name, str):
            return text, []
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(ParsedToolCall(name, arguments))
    content = _HERMES_RE.sub("", text).strip()
    return content or None, calls


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` (OpenAIError 400 naming the field) and say what to do."""
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

    if tool_choice is None:
        return ToolPlan("auto" if functions else "none", functions)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise OpenAIError(f"tool_choice {tool_choice!r} is not supported; use 'none', 'auto', 'required' or "
                              '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if tool_choice != "none" and not functions:
            raise OpenAIError(f"tool_choice {tool_choice!r} needs a non-empty tools list", param="tool_choice")
        return ToolPlan(tool_choice, functions)
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise OpenAIError('tool_choice must be "none", "auto", "required" or '
                          '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    if name not in functions:
        raise OpenAIError(f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
    return ToolPlan("named", functions, named=name)
