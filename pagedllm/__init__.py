"""pagedllm: a high-throughput, memory-efficient LLM inference and serving engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LLM", "BeamSearchParams", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "Logprob",
           "LoRARequest", "PoolingParams", "RequestOutput", "SamplingParams", "StructuredOutputsParams", "__version__"]

if TYPE_CHECKING:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.lora.request import LoRARequest
    from pagedllm.pooling import EmbeddingOutput, EmbeddingRequestOutput, PoolingParams
    from pagedllm.params import (
        BeamSearchParams,
        CompletionOutput,
        Logprob,
        RequestOutput,
        SamplingParams,
        StructuredOutputsParams,
    )


def __getattr__(name: str) -> Any:
    # Lazy: importing pagedllm.core (pure Python) must not pull in torch through the LLM class.
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    if name in ("SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob",
                "StructuredOutputsParams"):
        from pagedllm import params

        return getattr(params, name)
    if name in ("PoolingParams", "EmbeddingOutput", "EmbeddingRequestOutput"):
        from pagedllm import pooling

        return getattr(pooling, name)
    if name == "LoRARequest":
        from pagedllm.lora.request import LoRARequest

        return LoRARequest
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
