"""Reasoning read out of generated text: what a reasoning model writes between ``<think>`` and ``</think>`` goes to
``reasoning_content``, the rest to ``content`` (``--reasoning-parser``, vLLM's names), whole or streamed.

Usage (one parser per choice)::

    parser = make_reasoning_parser("qwen3", prompt_text, chat_template_kwargs)   # None: nothing to split
    delta = parser.feed(text_delta)      # ReasoningDelta(reasoning, content), reasoning always first
    delta = parser.finish()              # what was held back (a possible tag)
    reasoning, content = parser.parse(whole_text)

- ``qwen3``: reasoning only where the output opens ``<think>`` itself, or where the chat template opened it at the
  end of the prompt (Qwen3 thinking models). ``chat_template_kwargs`` ``{"enable_thinking": false}`` means no
  reasoning: the output is all content.
- ``deepseek_r1``: the output is reasoning up to ``</think>`` whether or not it opens ``<think>`` (DeepSeek-R1's
  templates open it in the prompt); without ``</think>`` it is all reasoning (cut short while thinking). A prompt
  that ends with ``</think>`` (the template closed thinking) means no reasoning.

An output shaped by a grammar from its first token (a forced tool call, structured outputs) cannot think first,
so there reasoning is only what opens with ``<think>``. Tool calls are read from the content after reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pagedllm.entrypoints.openai.tool_parsers.base import tag_prefix_length

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass
class ReasoningDelta:
    """What one piece of text adds: reasoning first, then content (the split happens once, at ``</think>``)."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Splits one choice's text into reasoning and content, fed piece by piece. ``starts_in_reasoning``: what the
    output is when it does not open with ``<think>`` (reasoning when the template opened it in the prompt)."""

    name: ClassVar[str] = ""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._default = "reasoning" if starts_in_reasoning else "content"
        self._state = "start"  # "start" (leading whitespace, a possible <think>), "reasoning", "content"
        self._held = ""

    @classmethod
    def for_request(cls, prompt: str, chat_template_kwargs: dict[str, Any] | None,
                    constrained: bool) -> ReasoningParser | None:
        """A parser for one choice of a request (None: the output has no reasoning to split off)."""
        raise NotImplementedError

    def feed(self, text: str) -> ReasoningDelta:
        out = ReasoningDelta()
        if self._state == "start":
            text = self._start(text)
        if self._state == "reasoning" and text:
            text = self._in_reasoning(text, out)
        if self._state == "content":
            out.content += text
        return out

    def finish(self) -> ReasoningDelta:
        held, self._held = self._held, ""
        state = self._default if self._state == "start" else self._state
        return ReasoningDelta(reasoning=held) if state == "reasoning" else ReasoningDelta(content=held)

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """``(reasoning, content)`` of a whole text: without reasoning (or tags), ``(None, text)``; else each is
        None when empty."""
        first, last = self.feed(text), self.finish()
        reasoning, content = first.reasoning + last.reasoning, first.content + last.content
        if content == text:
            return None, content  # no reasoning: the text as it is
        return reasoning or None, content or None

    def _start(self, text: str) -> str:
        """Hold the output's first characters until they show whether it opens with ``<think>``."""
        self._held += text
        body = self._held.lstrip()
        if body.startswith(THINK_START):
            self._state, self._held = "reasoning", ""
            return body[len(THINK_START):]
        if not body or THINK_START.startswith(body):
            return ""
        self._state = self._default
        text, self._held = self._held, ""
        return text

    def _in_reasoning(self, text: str, out: ReasoningDelta) -> str:
        text = self._held + text
        end = text.find(THINK_END)
        if end < 0:
            kept = tag_prefix_length(text, THINK_END)  # may be the start of </think>: held until known
            out.reasoning += text[:len(text) - kept]
            self._held = text[len(text) - kept:]
            return ""
        out.reasoning += text[:end]
        self._state, self._held = "content", ""
        return text[end + len(THINK_END):]


def _prompt_opens_thinking(prompt: str) -> bool:
    return prompt.rstrip().endswith(THINK_START)


class Qwen3ReasoningParser(ReasoningParser):
    """``qwen3``: see the module docstring."""

    name = "qwen3"

    @classmethod
    def for_request(cls, prompt: str, chat_template_kwargs: dict[str, Any] | None,
                    constrained: bool) -> ReasoningParser | None:
        if (chat_template_kwargs or {}).get("enable_thinking") is False:
            return None
        return cls(starts_in_reasoning=_prompt_opens_thinking(prompt) and not constrained)


class DeepSeekR1ReasoningParser(ReasoningParser):
    """``deepseek_r1``: see the module docstring."""

    name = "deepseek_r1"

    @classmethod
    def for_request(cls, prompt: str, chat_template_kwargs: dict[str, Any] | None,
                    constrained: bool) -> ReasoningParser | None:
        if prompt.rstrip().endswith(THINK_END):
            return None
        return cls(starts_in_reasoning=not constrained)


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def make_reasoning_parser(name: str, prompt: str, chat_template_kwargs: dict[str, Any] | None = None,
                          constrained: bool = False) -> ReasoningParser | None:
    """A parser of format ``name`` for one choice of a request whose rendered prompt is ``prompt``; None when the
    request's output has no reasoning (thinking turned off). ``constrained``: a grammar shapes the output from its
    first token."""
    try:
        family = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"Unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}") from None
    return family.for_request(prompt, chat_template_kwargs, constrained)
