"""The responses a ``/v1/responses`` request may continue with ``previous_response_id``: kept in memory, the least
recently used dropped past ``--max-stored-responses``."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.openai.protocol_responses import ResponsesResponse


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A finished response and the conversation it ends: its input and its output as chat messages, without its
    instructions (OpenAI does not carry those over to the next response)."""

    response: ResponsesResponse
    conversation: tuple[dict[str, Any], ...]


class ResponseStore:
    """An LRU map of response id to ``StoredResponse``, bounded by count. Each entry is bounded too: a stored
    conversation fit the model's context (its prompt was rendered and run)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, now the most recently used; None if unknown or already dropped."""
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, entry: StoredResponse) -> None:
        if self.max_entries <= 0:
            return
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
