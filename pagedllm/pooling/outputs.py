"""What ``LLM.embed`` returns (vLLM's shapes): ``EmbeddingRequestOutput(request_id, outputs=EmbeddingOutput(
embedding), prompt_token_ids, finished)``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EmbeddingOutput:
    """One prompt's vector."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """The result of one embedding request. ``error`` is set (and ``outputs.embedding`` empty) when the engine
    failed the request."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None
    error: str | None = None
    metrics: object | None = field(default=None, repr=False)
