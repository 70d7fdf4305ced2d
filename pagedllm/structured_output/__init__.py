"""Structured outputs (JSON schema, regex, choice, EBNF grammar) behind a small backend interface."""

from pagedllm.structured_output.manager import StructuredOutputManager, StructuredOutputRequest

__all__ = ["StructuredOutputManager", "StructuredOutputRequest"]
