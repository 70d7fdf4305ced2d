"""What one chat choice's generated text becomes: reasoning (``--reasoning-parser``), then content and tool calls
read from the text after the reasoning (the request's ``ToolPlan``), whole or streamed.

Usage: ``fmt = OutputFormat(tools, reasoning_parser, prompt_text, chat_template_kwargs, constrained)``, then per
choice ``fmt.read_whole(text)`` (a ``ReadMessage``) or ``fmt.choice_stream()`` (a ``ChoiceStream`` fed output
deltas). ``fmt.is_plain``: nothing to read, the text is the content (streamed as it comes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionResponseStreamChoice,
    DeltaMessage,
)
from pagedllm.entrypoints.openai.reasoning_parsers import ReasoningDelta, ReasoningParser, make_reasoning_parser
from pagedllm.entrypoints.openai.tool_calls import ToolPlan
from pagedllm.entrypoints.openai.tool_parsers import ParsedToolCall, ToolCallParser
from pagedllm.params import CompletionOutput


@dataclass
class ReadMessage:
    """A finished choice's assistant message."""

    content: str | None
    reasoning: str | None = None
    calls: list[ParsedToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class OutputFormat:
    """How a request's choices are read. ``reasoning_parser``: the server's ``--reasoning-parser`` (None: none);
    ``prompt``: the rendered prompt (whether the template opened thinking); ``constrained``: a grammar shapes the
    output from its first token; ``include_reasoning`` False leaves reasoning out of the message."""

    tools: ToolPlan
    reasoning_parser: str | None = None
    prompt: str = ""
    chat_template_kwargs: dict[str, Any] | None = None
    constrained: bool = False
    include_reasoning: bool = True

    def new_reasoning_parser(self) -> ReasoningParser | None:
        if self.reasoning_parser is None:
            return None
        return make_reasoning_parser(self.reasoning_parser, self.prompt, self.chat_template_kwargs, self.constrained)

    @property
    def is_plain(self) -> bool:
        return self.tools.mode == "none" and self.new_reasoning_parser() is None

    def read_whole(self, text: str) -> ReadMessage:
        """A finished choice: the same split a stream makes."""
        parser = self.new_reasoning_parser()
        reasoning, content = parser.parse(text) if parser is not None else (None, text)
        content, calls = self.tools.parse(content) if content is not None else (None, [])
        return ReadMessage(content, reasoning if self.include_reasoning else None, calls)

    def choice_stream(self) -> ChoiceStream:
        return ChoiceStream(self.new_reasoning_parser(), self.tools.stream_parser(), self.include_reasoning)


class ChoiceStream:
    """One streamed choice read by its parsers: its chunks, with logprobs and token ids held until a chunk goes
    out."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None,
                 include_reasoning: bool = True) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.include_reasoning = include_reasoning
        self._held_logprobs: list[Any] = []
        self._held_token_ids: list[int] = []

    @property
    def calls(self) -> list[ParsedToolCall]:
        return self.tools.calls if self.tools is not None else []

    def choices(self, completion: CompletionOutput, logprobs: ChatCompletionLogProbs | None,
                wants_logprobs: bool, wants_token_ids: bool = False) -> list[ChatCompletionResponseStreamChoice]:
        """The chunks of one output delta: reasoning, content and tool-call deltas, then the finish chunk if it
        finished."""
        if logprobs is not None and logprobs.content:
            self._held_logprobs.extend(logprobs.content)
        if wants_token_ids:
            self._held_token_ids.extend(completion.token_ids)
        finished = completion.finish_reason is not None
        deltas = self.deltas(completion.text, finished)
        choices = [ChatCompletionResponseStreamChoice(index=completion.index, delta=delta) for delta in deltas]
        if finished:
            choices.append(ChatCompletionResponseStreamChoice(
                index=completion.index, delta=DeltaMessage(),
                finish_reason=finish_reason(completion.finish_reason, self.calls),
                stop_reason=completion.stop_reason))
        if choices and wants_logprobs and (self._held_logprobs or finished):
            choices[-1].logprobs = ChatCompletionLogProbs(content=self._held_logprobs)
            self._held_logprobs = []
        if choices and wants_token_ids:
            choices[-1].token_ids, self._held_token_ids = self._held_token_ids, []
        return choices

    def deltas(self, text: str, finished: bool) -> list[DeltaMessage]:
        """The message deltas of one piece of text (``finished``: the last piece; held text comes out)."""
        split = self._split(text, finished)
        deltas = []
        if split.reasoning and self.include_reasoning:
            deltas.append(DeltaMessage(reasoning_content=split.reasoning))
        if self.tools is None:
            if split.content:
                deltas.append(DeltaMessage(content=split.content))
            return deltas
        deltas += self.tools.feed(split.content)
        return deltas + (self.tools.finish() if finished else [])

    def _split(self, text: str, finished: bool) -> ReasoningDelta:
        if self.reasoning is None:
            return ReasoningDelta(content=text)
        split = self.reasoning.feed(text)
        if finished:  # reasoning always comes before content, so the held text appends to each in order
            last = self.reasoning.finish()
            split = ReasoningDelta(split.reasoning + last.reasoning, split.content + last.content)
        return split


def finish_reason(reason: str | None, calls: list[ParsedToolCall]) -> str | None:
    """"tool_calls" when the model made calls and stopped by itself (not cut by max_tokens or aborted)."""
    return "tool_calls" if calls and reason == "stop" else reason
