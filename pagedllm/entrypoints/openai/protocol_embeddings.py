"""Pydantic models of OpenAI's embeddings API (``POST /v1/embeddings``) plus vLLM's extras
(``truncate_prompt_tokens``, ``normalize``). Strict types as in ``protocol.py``: a wrong type is a 400 naming the
field; unknown fields are kept and ignored."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from pagedllm.entrypoints.openai.protocol import OpenAIBaseModel, RequestModel


class EmbeddingRequest(RequestModel):
    """OpenAI's request: ``input`` is a string, a list of strings, a list of token ids or a list of id lists."""

    input: list[int] | list[list[int]] | str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM's extras: embed only the last N tokens of a longer input (-1: max_model_len); L2-normalize (None: the
    # model's default).
    truncate_prompt_tokens: int | None = None
    normalize: bool | None = None


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIBaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
