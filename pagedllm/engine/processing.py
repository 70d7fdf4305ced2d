"""Prompts into the engine: tokenize and validate prompts and sampling parameters, build core requests.

A request with ``n > 1`` fans out into n core requests (``"{index}_{request_id}"``), one per sequence; the output
processor gathers their outputs back into one RequestOutput.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.engine.contracts import EngineCoreRequest
from pagedllm.lora.request import LoRARequest
from pagedllm.lora.validation import LoRARequestValidator
from pagedllm.params import RequestOutputKind, SamplingParams
from pagedllm.pooling.params import PoolingParams

PromptInput = str | dict[str, Any]  # "text", {"prompt": "text"} or {"prompt_token_ids": [...]}


def load_tokenizer(model_config: ModelConfig):
    """The Hugging Face tokenizer of the model (fast when available). For a GGUF model (a ``.gguf`` file, or a directory
    holding one): the ``tokenizer.json`` beside it if there is one, else the tokenizer converted from its metadata."""
    from transformers import AutoTokenizer

    from pagedllm.model.gguf import find_gguf_file, load_gguf_tokenizer

    try:
        gguf_file = find_gguf_file(model_config.tokenizer)
        if gguf_file is None:
            return AutoTokenizer.from_pretrained(model_config.tokenizer)
        if (gguf_file.parent / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(gguf_file.parent))
        return load_gguf_tokenizer(gguf_file)
    except Exception as exc:
        raise ValueError(
            f"Could not load a tokenizer from {model_config.tokenizer!r} ({exc}). Pass tokenizer=..., or "
            "skip_tokenizer_init=True to use token-id prompts only."
        ) from exc


# ---- inputs ----------------------------------------------------------------------------------------------------


@dataclass
class ProcessedRequest:
    """A validated request: its prompt and the core requests (one per sequence) it fans out into."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    requests: list[EngineCoreRequest]  # what the engine core gets: plain data, grammars compiled there
    arrival_time: float
    lora_request: LoRARequest | None = None
    pooling_params: PoolingParams | None = None  # an embedding request (resolved); ``params`` is then a stand-in


class InputProcessor:
    """Tokenizes and validates prompts and sampling parameters before anything is queued."""

    def __init__(self, config: EngineConfig, tokenizer, structured_output_manager=None, core_id_prefix: str = "") -> None:
        """``structured_output_manager``: what ``structured_output_manager`` returns (the engine core process's
        stand-in, ``grammar_calls.CoreGrammarPreparer``); None: a ``StructuredOutputManager`` made here on first use.
        ``core_id_prefix``: put before the request id in the core's request ids, so that those of several API
        server processes sharing one core never collide (the output processor maps them back)."""
        self.config = config
        self.core_id_prefix = core_id_prefix
        self.model_config = config.model_config
        self.max_model_len = config.scheduler_config.max_model_len
        self.tokenizer = tokenizer
        self.eos_token_ids = config.model_config.eos_token_ids  # resolved once: see resolve_eos_token_ids
        self._seed_rng = random.Random(config.seed)
        self._structured_output_manager = structured_output_manager  # else made on the first constrained request
        self._manager_lock = threading.Lock()  # the event loop and a warm-up thread may both ask first
        self.lora_validator = LoRARequestValidator(config.model_config, config.lora_config)

    @property
    def structured_output_manager(self):
        """The grammar compiler and cache, made on first use; ValueError without a tokenizer. The engine core makes
        the grammar objects: in-process it shares this manager (one compile); in its own process it owns the only
        manager, and this is the stand-in given at construction, which asks the core (``prepare`` only)."""
        if self.tokenizer is None:
            raise ValueError("structured_outputs needs a tokenizer; this engine was built with skip_tokenizer_init=True")
        with self._manager_lock:
            if self._structured_output_manager is None:
                from pagedllm.structured_output import StructuredOutputManager

                self._structured_output_manager = StructuredOutputManager.for_engine(self.tokenizer, self.config)
            return self._structured_output_manager

    def shutdown_structured_outputs(self) -> None:
        """Shut the manager down, if there is one: its compile workers are killed, pending compiles fail at once."""
        with self._manager_lock:
            manager = self._structured_output_manager
        if manager is not None:
            manager.shutdown()

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """Raise ValueError now if the request's spec does not parse (the compile goes on in the background)."""
        if getattr(params, "structured_outputs", None) is not None:  # (PoolingParams have none)
            self.structured_output_manager.new_requests(params.structured_outputs, 0)

    def process(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams | PoolingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> ProcessedRequest:
        """Validate and build the core requests: sampling for a generation engine, pooling for an embedding one
        (each refuses the other's parameters)."""
        if isinstance(params, PoolingParams) or self.config.is_pooling:
            return self._process_pooling(request_id, prompt, params, arrival_time, priority, lora_request)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        prompt_text, prompt_token_ids = self.tokenize(prompt)
        self._validate(prompt_token_ids, params)
        lora_request = self.lora_validator.check(lora_request)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_token_ids)
        core_id = self.core_id_prefix + request_id
        requests = [
            EngineCoreRequest(
                request_id=_child_id(core_id, index, params.n),
                prompt_token_ids=prompt_token_ids,
                sampling_params=_child_params(params, index),
                sampling_seed=self._sampling_seed(params, index),
                max_tokens=max_tokens,
                arrival_time=arrival_time,
                priority=priority,
                # Later sequences start from the first one's prompt blocks, shared with copy-on-write.
                fork_source=_child_id(core_id, 0, params.n) if index > 0 else None,
                lora_request=lora_request,
            )
            for index in range(params.n)
        ]
        return ProcessedRequest(request_id, prompt_text, prompt_token_ids, params, requests, arrival_time,
                                lora_request)

    def _process_pooling(self, request_id: str, prompt: PromptInput, params: PoolingParams | SamplingParams,
                         arrival_time: float | None, priority: int, lora_request: LoRARequest | None
                         ) -> ProcessedRequest:
        """An embedding request: its prompt runs through the scheduler like a prefill and finishes pooled."""
        _check_runner_accepts(self.config.is_pooling, params)
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported for embeddings")
        pooling_params = params.resolved(self.config.pooler_config, self.model_config.hidden_size)
        prompt_text, prompt_token_ids = self.tokenize(prompt)
        prompt_token_ids = _truncated(prompt_token_ids, params.truncate_prompt_tokens, self.max_model_len)
        self._validate_pooling_prompt(prompt_token_ids)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # Never sampled (the request finishes when its prompt is computed); max_tokens 1 bounds it even so.
        stand_in = _pooling_stand_in()
        core_request = EngineCoreRequest(self.core_id_prefix + request_id, prompt_token_ids, stand_in, 0, 1,
                                         arrival_time, priority,
                                         pooling_params=pooling_params)
        return ProcessedRequest(request_id, prompt_text, prompt_token_ids, stand_in, [core_request], arrival_time,
                                pooling_params=pooling_params)

    def _validate_pooling_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("The input is empty: it must contain at least one token")
        vocab_size = self.model_config.vocab_size
        out_of_range = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if out_of_range:
            raise ValueError(f"Token id {out_of_range[0]} in the input is out of vocabulary (vocab_size={vocab_size})")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(
                f"The input has {len(prompt_token_ids)} tokens, more than this model's maximum context length "
                f"(max_model_len) of {self.max_model_len}. Shorten it, or set truncate_prompt_tokens."
            )

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """The prompt's text (if any) and token ids."""
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not _is_list_of_ints(token_ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(token_ids)
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise ValueError(f"A prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {prompt!r}")
        if self.tokenizer is None:
            raise ValueError("Text prompts need a tokenizer; this engine was built with skip_tokenizer_init=True")
        return text, self.tokenizer.encode(text)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("The prompt is empty: it must contain at least one token")
        vocab_size = self.model_config.vocab_size
        out_of_range = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if out_of_range:
            raise ValueError(f"Token id {out_of_range[0]} in the prompt is out of vocabulary (vocab_size={vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"The prompt has {len(prompt_token_ids)} tokens, but this model's maximum context length "
                f"(max_model_len) is {self.max_model_len}, which must also leave room for at least one "
                "generated token. Shorten the prompt."
            )
        params.verify_for_vocab(vocab_size)
        if params.stop and (self.tokenizer is None or not params.detokenize):
            raise ValueError("stop strings need detokenization: a tokenizer and detokenize=True")

    def _sampling_seed(self, params: SamplingParams, index: int) -> int:
        """A seeded request uses its seed (+ the sequence index); others get a seed from the engine's RNG."""
        if params.seed is not None:
            return params.seed + index
        return self._seed_rng.getrandbits(63)


def _is_list_of_ints(value: Any) -> bool:
    """A list whose items are ints (bools are not token ids)."""
    if not isinstance(value, list):
        return False
    if set(map(type, value)) <= {int}:  # the usual case, a third of the time of the loop below
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _check_runner_accepts(is_pooling_engine: bool, params: object) -> None:
    """An engine serves either generation or embeddings: a request for the other is refused, naming the flag."""
    if is_pooling_engine and not isinstance(params, PoolingParams):
        raise ValueError("This engine serves embeddings (runner='pooling' / task='embed'): it does not generate. "
                         "Start it without --runner pooling / --task embed to generate text.")
    if not is_pooling_engine:
        raise ValueError("This engine generates text: embeddings need an engine started with runner='pooling' "
                         "(--runner pooling, or task='embed' / --task embed).")


def _pooling_stand_in() -> SamplingParams:
    params = SamplingParams(max_tokens=1)
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


def _truncated(token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """The last ``truncate_prompt_tokens`` tokens (-1: the last max_model_len), as vLLM truncates; all if None."""
    if truncate_prompt_tokens is None:
        return token_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return token_ids[-keep:]


def _child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{index}_{request_id}"


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    if params.n == 1:
        return params
    child = params.clone()
    child.n = 1
    if index > 0:
        child.prompt_logprobs = None  # computed once, by the first sequence
    return child


def resolve_eos_token_ids(model_config: ModelConfig, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: the model config's, the tokenizer's and generation_config.json's (where Llama-3-Instruct
    lists ``<|eot_id|>``). Resolved once, when the engine is built, into ``ModelConfig.eos_token_ids``, which stop
    detection, the ``min_tokens`` ban, grammars and beam search all read."""
    ids = list(model_config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    generation_config = Path(model_config.model) / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    return tuple(dict.fromkeys(ids))
