"""Grammars that are genuinely slow to compile in xgrammar (0.2.9), for tests of compile deadlines and isolation.

xgrammar's JSON-schema converter expands a ``pattern`` of nested counted repetitions such as
``^((d{1,33}b){1,33}c){1,33}$`` into a grammar of ~9 MB (it switches to its compact repeat form only from ~38 up);
each such property costs ~0.6 s to parse and ~2.5 s to compile, even with the 300-token test vocabulary.
Measured on the 2-core CI machine, tiny test vocabulary, ``GrammarCompiler(max_threads=1)``:

    slow_json_schema("x")  (6 properties): parse 3.5 s + compile 15.0 s = 18.5 s, serialized result 185 MB

So at a compile deadline of 0.5-2 s the compile is always still running. Every call with a new ``tag`` gives a
schema of its own (a new cache key), so tests in one process do not share a compile.

Use it as ``{"structured_outputs": {"json": slow_json_schema("my-test")}}`` or as the schema of a
``response_format`` of type ``json_schema``.
"""

from __future__ import annotations

import json
from typing import Any

# Letters for the innermost repetition of each property (distinct, so xgrammar cannot share the expanded rules).
_LETTERS = "defghijklm"


def slow_json_schema(tag: str, num_properties: int = 6) -> dict[str, Any]:
    """A JSON schema whose compile takes ~3 s per property (see the module docstring); ``tag`` names a property,
    so each tag is a distinct spec."""
    properties: dict[str, Any] = {
        f"p{i}": {"type": "string", "pattern": "^((%s{1,33}b){1,33}c){1,33}$" % _LETTERS[i % len(_LETTERS)]}
        for i in range(num_properties)
    }
    properties[f"tag_{tag}"] = {"type": "integer"}
    return {"type": "object", "properties": properties, "required": list(properties)}


def slow_json_schema_text(tag: str, num_properties: int = 6) -> str:
    """``slow_json_schema`` as a JSON string (the form a ``structured_outputs.json`` string takes)."""
    return json.dumps(slow_json_schema(tag, num_properties))


# A cheap grammar to compile next to a slow one: milliseconds.
FAST_JSON_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
