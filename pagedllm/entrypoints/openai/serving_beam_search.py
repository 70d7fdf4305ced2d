"""``use_beam_search`` on the server, with vLLM's semantics: ``n`` is the beam width and the ``n`` best hypotheses
come back best first; ``length_penalty`` and ``ignore_eos`` as in ``BeamSearchParams``.

The search is the one of ``entrypoints/beam_search.py`` (HF transformers' rules, shared with ``LLM.beam_search``),
driven through the async engine: each step runs every live beam as a one-token request, all of them concurrently,
so the engine batches them with everyone else's work. Cancelling the search (the client went away) aborts the
step's requests in flight. The request's ``timeout`` bounds the whole search (not each step): past it the step in
flight is cancelled (its engine requests aborted, their KV freed) and the request ends with RequestTimeoutError
(a 408), counted once in ``request_rejected_total{reason="request_timeout"}``.

What beam search cannot honour is refused (400) rather than silently dropped: streaming, logprobs, stop strings and
ids, min_tokens, logit_bias and penalties. The sampling knobs (temperature, top_p, top_k, min_p, seed) do not apply to
a search over the model's own logprobs and are ignored, as vLLM does.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.engine.deadlines import RequestTimeoutError
from pagedllm.entrypoints.beam_search import BeamSearchOutput, BeamSearchState, BeamSearchStep, decode_sequences
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.offload import off_loop
from pagedllm.entrypoints.openai.protocol import SamplingFields
from pagedllm.lora.request import LoRARequest
from pagedllm.params import MAX_N, BeamSearchParams, RequestOutput, SamplingParams


def check_beam_search_request(request: SamplingFields, wants_logprobs: bool) -> None:
    """A 400 naming the first field that beam search cannot honour (``wants_logprobs``: the endpoint's own
    logprobs field asks for some)."""
    unsupported = {
        "stream": request.stream,
        "logprobs": wants_logprobs,
        "prompt_logprobs": request.prompt_logprobs is not None,
        "stop": bool(request.stop),
        "stop_token_ids": bool(request.stop_token_ids),
        "min_tokens": request.min_tokens > 0,
        "logit_bias": bool(request.logit_bias),
        "presence_penalty": request.presence_penalty not in (None, 0),
        "frequency_penalty": request.frequency_penalty not in (None, 0),
        "repetition_penalty": request.repetition_penalty not in (None, 1),
    }
    for name, is_set in unsupported.items():
        if is_set:
            what = "streaming" if name == "stream" else name
            raise OpenAIError(f"{what} is not supported with use_beam_search", param=name)
    if not 1 <= request.n <= MAX_N:
        raise OpenAIError(f"n (the beam width with use_beam_search) must be in [1, {MAX_N}], got {request.n}",
                          param="n")
    if not math.isfinite(request.length_penalty):
        raise OpenAIError(f"length_penalty must be a finite number, got {request.length_penalty}",
                          param="length_penalty")


def build_beam_search_params(request: SamplingFields, max_tokens: int | None, num_prompt_tokens: int,
                             max_model_len: int, max_tokens_param: str = "max_tokens") -> BeamSearchParams:
    """BeamSearchParams of one prompt; ``max_tokens`` None means the rest of the context."""
    if max_tokens is None:
        max_tokens = max_model_len - num_prompt_tokens
    try:
        return BeamSearchParams(beam_width=request.n, max_tokens=max_tokens, ignore_eos=request.ignore_eos,
                                length_penalty=request.length_penalty)
    except ValueError as exc:
        raise OpenAIError(str(exc), param="n" if str(exc).startswith("beam_width") else max_tokens_param) from None


async def beam_search(
    engine: AsyncEngine,
    prompt_token_ids: Sequence[list[int]],
    params: Sequence[BeamSearchParams],
    request_id: str,
    priority: int = 0,
    skip_special_tokens: bool = True,
    lora_request: LoRARequest | None = None,
    timeout_s: float | None = None,
) -> list[BeamSearchOutput]:
    """The beam searches of several prompts at once (one step advances them all), with their texts (decoded on a
    front-end thread: up to width x prompts long sequences). Past ``timeout_s`` (the whole search), raises
    RequestTimeoutError after aborting the step in flight."""
    search = _search(engine, prompt_token_ids, params, request_id, priority, skip_special_tokens, lora_request)
    if timeout_s is None:
        return await search
    try:
        async with asyncio.timeout(timeout_s):
            return await search
    except TimeoutError:
        engine.record_request_timeout()
        raise RequestTimeoutError("The request did not finish within its timeout and was aborted") from None


async def _search(engine: AsyncEngine, prompt_token_ids: Sequence[list[int]], params: Sequence[BeamSearchParams],
                  request_id: str, priority: int, skip_special_tokens: bool,
                  lora_request: LoRARequest | None) -> list[BeamSearchOutput]:
    states = [BeamSearchState(list(token_ids), prompt_params, engine.eos_token_ids)
              for token_ids, prompt_params in zip(prompt_token_ids, params)]
    step_index = 0
    while (step := BeamSearchStep.of(states)) is not None:
        step.advance(await _run_step(engine, step, f"{request_id}-beam{step_index}", priority, lora_request))
        step_index += 1
    return await off_loop(_decode_outputs, states, engine.tokenizer, skip_special_tokens)


def _decode_outputs(states: Sequence[BeamSearchState], tokenizer, skip_special_tokens: bool) -> list[BeamSearchOutput]:
    return [decode_sequences(state.output(), tokenizer, skip_special_tokens) for state in states]


async def _run_step(engine: AsyncEngine, step: BeamSearchStep, request_id: str, priority: int,
                    lora_request: LoRARequest | None) -> list[RequestOutput]:
    """Every request of the step concurrently; on failure or cancellation the others are cancelled too, which
    aborts their engine requests."""
    tasks = [asyncio.ensure_future(_final_output(engine, prompt, step.params, f"{request_id}-{index}", priority,
                                                 lora_request))
             for index, prompt in enumerate(step.prompts)]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the finished ones


async def _final_output(engine: AsyncEngine, prompt: dict[str, Any], params: SamplingParams, request_id: str,
                        priority: int, lora_request: LoRARequest | None) -> RequestOutput:
    final = None
    async with aclosing(engine.generate(prompt, params, request_id, priority, lora_request)) as outputs:
        async for output in outputs:
            final = output
    return final
