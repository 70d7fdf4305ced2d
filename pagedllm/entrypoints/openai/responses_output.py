"""The output items of a ``/v1/responses`` response (reasoning, message, function calls), built whole from a read
message or streamed as OpenAI's typed events from the chat path's message deltas (``chat_output.ChoiceStream``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.openai.chat_output import ReadMessage
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import DeltaMessage
from pagedllm.entrypoints.openai.protocol_responses import (
    ContentPartEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    OutputFunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ReasoningText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    ResponseErrorEvent,
    ResponseLifecycleEvent,
    ResponsesResponse,
    ResponseStreamEvent,
)
from pagedllm.entrypoints.openai.tool_parsers import ParsedToolCall


def new_id(prefix: str) -> str:
    """OpenAI's id shapes: ``resp_...``, ``msg_...``, ``rs_...``, ``fc_...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


def response_status(finish_reason: str | None) -> str:
    """"incomplete" when max_output_tokens (or the context) cut the output."""
    return "incomplete" if finish_reason == "length" else "completed"


# ---- whole -------------------------------------------------------------------------------------------------------


def output_items(read: ReadMessage, status: str) -> list[OutputItem]:
    """A finished generation's items, in the order a stream opens them; the last one ends with ``status`` (the
    others were finished when the next began)."""
    items: list[OutputItem] = []
    if read.reasoning:
        items.append(_reasoning_item(read.reasoning))
    if read.content:
        items.append(_message_item(read.content))
    items += [_function_call_item(call) for call in read.calls]
    if items:
        items[-1].status = status
    return items


def _reasoning_item(text: str, status: str = "completed") -> OutputReasoning:
    return OutputReasoning(id=new_id("rs"), status=status, content=[ReasoningText(text=text)])


def _message_item(text: str, status: str = "completed") -> OutputMessage:
    return OutputMessage(id=new_id("msg"), status=status, content=[OutputText(text=text)])


def _function_call_item(call: ParsedToolCall, status: str = "completed") -> OutputFunctionCall:
    return OutputFunctionCall(id=new_id("fc"), status=status, call_id=call.id, name=call.name,
                              arguments=call.arguments)


# ---- streamed ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TextKind:
    """An item made of one text part (a message's output_text, a reasoning item's reasoning_text): how it opens,
    and the events that carry its text."""

    make_item: Callable[[str, str], OutputMessage | OutputReasoning]
    make_part: Callable[[str], OutputText | ReasoningText]
    delta: tuple[type[ResponseStreamEvent], str]
    done: tuple[type[ResponseStreamEvent], str]


_MESSAGE = _TextKind(_message_item, lambda text: OutputText(text=text),
                     (OutputTextDeltaEvent, "response.output_text.delta"),
                     (OutputTextDoneEvent, "response.output_text.done"))
_REASONING = _TextKind(_reasoning_item, lambda text: ReasoningText(text=text),
                       (ReasoningTextDeltaEvent, "response.reasoning_text.delta"),
                       (ReasoningTextDoneEvent, "response.reasoning_text.done"))


def _kind_of(item: OutputItem) -> _TextKind:
    return _MESSAGE if isinstance(item, OutputMessage) else _REASONING


class ResponseStreamWriter:
    """Turns one generation's message deltas into Responses events (numbered, as SSE text) and keeps the output
    items they describe, so that the final ``response.completed`` holds exactly what was streamed. One item is
    open at a time: reasoning, text or a tool call opens an item of its kind, which closes the one before.

    ``make_response(status, output, usage)``: the response object around the items (the request's settings)."""

    def __init__(self, make_response: Callable[..., ResponsesResponse]) -> None:
        self.make_response = make_response
        self.items: list[OutputItem] = []
        self._open: OutputItem | None = None
        self._sequence_number = 0

    def start(self) -> str:
        response = self.make_response("in_progress", [], None)
        return (self._event(ResponseLifecycleEvent, "response.created", response=response)
                + self._event(ResponseLifecycleEvent, "response.in_progress", response=response))

    def deltas(self, deltas: list[DeltaMessage]) -> str:
        events = []
        for delta in deltas:
            if delta.reasoning_content:
                events += self._text(_REASONING, delta.reasoning_content)
            if delta.content:
                events += self._text(_MESSAGE, delta.content)
            for call in delta.tool_calls or ():
                if call.id is not None:
                    events += self._start_call(call.id, call.function.name)
                events += self._arguments(call.function.arguments or "")
        return "".join(events)

    def finish(self, status: str, usage: Any) -> tuple[str, ResponsesResponse]:
        """The events that close the open item and end the stream, and the final response."""
        events = self._close_open(status)
        response = self.make_response(status, self.items, usage)
        event_type = "response.completed" if status == "completed" else "response.incomplete"
        return "".join(events) + self._event(ResponseLifecycleEvent, event_type, response=response), response

    def error(self, error: OpenAIError) -> str:
        return self._event(ResponseErrorEvent, "error", message=error.message, code=error.code, param=error.param)

    def _event(self, event_model: type[ResponseStreamEvent], event_type: str, **fields: Any) -> str:
        """One SSE: ``event:`` names the type (OpenAI's streams carry it twice), ``data:`` the numbered event."""
        event = event_model(type=event_type, sequence_number=self._sequence_number, **fields)
        self._sequence_number += 1
        return f"event: {event_type}\ndata: {event.model_dump_json()}\n\n"

    # ---- items -----------------------------------------------------------------------------------------------

    def _text(self, kind: _TextKind, text: str) -> list[str]:
        is_open = isinstance(self._open, (OutputMessage, OutputReasoning)) and _kind_of(self._open) is kind
        events = [] if is_open else self._open_text(kind)
        self._open.content[0].text += text
        event_model, event_type = kind.delta
        return events + [self._event(event_model, event_type, item_id=self._open.id, output_index=self._index,
                                     delta=text)]

    def _open_text(self, kind: _TextKind) -> list[str]:
        events = self._close_open("completed")
        item = kind.make_item("", "in_progress")
        item.content = []  # announced empty; its part is added next
        events.append(self._add(item))
        item.content.append(kind.make_part(""))
        events.append(self._event(ContentPartEvent, "response.content_part.added", item_id=item.id,
                                  output_index=self._index, part=kind.make_part("")))
        return events

    def _start_call(self, call_id: str, name: str) -> list[str]:
        events = self._close_open("completed")
        call = _function_call_item(ParsedToolCall(name, "", call_id), "in_progress")
        return events + [self._add(call)]

    def _arguments(self, text: str) -> list[str]:
        if not text or not isinstance(self._open, OutputFunctionCall):
            return []
        self._open.arguments += text
        return [self._event(FunctionCallArgumentsDeltaEvent, "response.function_call_arguments.delta",
                            item_id=self._open.id, output_index=self._index, delta=text)]

    def _add(self, item: OutputItem) -> str:
        self.items.append(item)
        self._open = item
        added = item.model_copy(deep=True)  # the item as it is now: the kept one goes on growing
        return self._event(OutputItemEvent, "response.output_item.added", output_index=self._index, item=added)

    def _close_open(self, status: str) -> list[str]:
        """The "done" events of the open item, which ends with ``status``; none when no item is open."""
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.items) - 1  # the open item is the last one
        item.status = status
        if isinstance(item, OutputFunctionCall):
            events = [self._event(FunctionCallArgumentsDoneEvent, "response.function_call_arguments.done",
                                  item_id=item.id, output_index=index, name=item.name, arguments=item.arguments)]
        else:
            part = item.content[0]
            event_model, event_type = _kind_of(item).done
            events = [self._event(event_model, event_type, item_id=item.id, output_index=index, text=part.text),
                      self._event(ContentPartEvent, "response.content_part.done", item_id=item.id,
                                  output_index=index, part=part)]
        events.append(self._event(OutputItemEvent, "response.output_item.done", output_index=index, item=item))
        return events

    @property
    def _index(self) -> int:
        """The output index of the open item (always the last one)."""
        return len(self.items) - 1
