"""``POST /v1/embeddings``: each input becomes one embedding request of the engine (batched by the scheduler with
the others as prefills); the answer lists the vectors in input order, as floats or base64 (little-endian float32,
as OpenAI encodes them), with the prompt tokens as usage."""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from typing import Any

from fastapi import Request, Response

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.limits import LimitExceeded, check_embedding_inputs_limit
from pagedllm.entrypoints.openai.protocol_embeddings import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from pagedllm.entrypoints.openai.serving_common import (
    ServingContext,
    check_token_ids,
    json_response,
    merge_generations,
    random_id,
    run_unless_disconnected,
)
from pagedllm.pooling import EmbeddingRequestOutput, PoolingParams

RUNNER_FLAG_HINT = "--runner pooling (or --task embed)"


class OpenAIServingEmbedding:
    """Serves embeddings for an engine started with ``runner="pooling"``."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create_embedding(self, request: EmbeddingRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        check_serves_embeddings(ctx)
        model_name = ctx.models.check(request.model)
        prompts = self._prompts(request)
        params = self._params(request)
        request_id = random_id("embd")
        outputs = await run_unless_disconnected(raw_request, _collect(ctx, prompts, params, request_id))
        return json_response(_response(request_id, model_name, outputs, request.encoding_format))

    def _prompts(self, request: EmbeddingRequest) -> list[dict[str, Any]]:
        """The inputs as engine prompts; empty or too many inputs, and bad token ids, are a 400 naming ``input``."""
        inputs = _as_list(request.input)
        if not inputs or any(len(item) == 0 for item in inputs):
            raise OpenAIError("input must not be empty (nor hold an empty string or token list)", param="input")
        try:
            check_embedding_inputs_limit(len(inputs), self.ctx.limits)
        except LimitExceeded as exc:
            raise OpenAIError(str(exc), param=exc.param) from None
        prompts = []
        for item in inputs:
            if isinstance(item, str):
                prompts.append({"prompt": item})
            else:
                check_token_ids(item, self.ctx.vocab_size, "input")
                prompts.append({"prompt_token_ids": list(item)})
        return prompts

    def _params(self, request: EmbeddingRequest) -> PoolingParams:
        try:
            params = PoolingParams(dimensions=request.dimensions, normalize=request.normalize,
                                   truncate_prompt_tokens=request.truncate_prompt_tokens)
            engine_config = self.ctx.engine.config
            params.resolved(engine_config.pooler_config, engine_config.model_config.hidden_size)  # checks dimensions
        except ValueError as exc:
            raise OpenAIError(str(exc), param=_param_of(str(exc))) from None
        return params


def check_serves_embeddings(ctx: ServingContext) -> None:
    if not ctx.engine.config.is_pooling:
        raise OpenAIError(f"This server generates text; it does not serve embeddings. Start it with "
                          f"{RUNNER_FLAG_HINT} to serve /v1/embeddings.", param="model", code="embeddings_not_served")


def check_serves_generation(ctx: ServingContext) -> None:
    """The generation routes refuse at once on an embedding server (before any parsing or admission cost)."""
    if ctx.engine.config.is_pooling:
        raise OpenAIError(f"This server serves embeddings ({RUNNER_FLAG_HINT}); it does not generate text. Use "
                          "/v1/embeddings, or start the server without that flag.", param="model",
                          code="generation_not_served")


def _as_list(value: str | list) -> list[str] | list[list[int]]:
    """One input per item: a string or a token-id list alone is one input."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]
    return value


def _param_of(message: str) -> str:
    for name in ("dimensions", "truncate_prompt_tokens", "normalize"):
        if name in message:
            return name
    return "input"


async def _collect(ctx: ServingContext, prompts: Sequence[dict[str, Any]], params: PoolingParams,
                   request_id: str) -> list[EmbeddingRequestOutput]:
    """Run one engine request per input; their final outputs in input order. A too-long input is a 400."""
    outputs: list[EmbeddingRequestOutput | None] = [None] * len(prompts)
    try:
        async for index, output in merge_generations(ctx.engine, prompts, [params] * len(prompts), request_id):
            outputs[index] = output
    except ValueError as exc:
        message = str(exc)
        code = "context_length_exceeded" if "max_model_len" in message else None
        raise OpenAIError(message, param="input", code=code) from None
    return outputs  # type: ignore[return-value]


def _response(request_id: str, model_name: str, outputs: list[EmbeddingRequestOutput],
              encoding_format: str) -> EmbeddingResponse:
    data = [EmbeddingData(index=index, embedding=_encode(output.outputs.embedding, encoding_format))
            for index, output in enumerate(outputs)]
    num_prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    return EmbeddingResponse(id=request_id, model=model_name, data=data,
                             usage=EmbeddingUsage(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens))


def _encode(embedding: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return embedding
    return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode("ascii")



