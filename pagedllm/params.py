"""What a user asks for (``SamplingParams``) and what the engine hands back (``RequestOutput``).

A leaf module: no torch, no other pagedllm import, so the pure-Python scheduler side can use it.

``SamplingParams`` follows vLLM's field names, defaults and validation rules, so code written against vLLM runs
unchanged. Every invalid value raises ``ValueError`` whose message starts with the field's name: the OpenAI server
turns it into an HTTP 400 naming the bad parameter.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# Temperatures in (SAMPLING_EPS, MIN_TEMPERATURE) are raised to MIN_TEMPERATURE, as vLLM does: dividing logits by
# a tinier number invites inf/nan in half precision and is greedy in all but name.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 2.0
MAX_N = 16384  # vLLM's default VLLM_MAX_N_SEQUENCES
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's bound on logit_bias values
# The engine packs counts (top_k, token counts, logprob counts) into int32/int64 arrays and seeds into int64: a
# value outside these ranges would raise inside the engine step, for the whole batch, instead of here.
MAX_INT32 = 2**31 - 1
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1
# The sampler works in float32: a finite float64 beyond this becomes inf there.
MAX_FLOAT32 = 3.4028234663852886e38


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a request carries (vLLM's ``output_kind``)."""

    CUMULATIVE = 0  # every step: everything so far
    DELTA = 1  # every step: only what is new (streaming)
    FINAL_ONLY = 2  # once, when finished (offline generate)


class SamplingType(enum.IntEnum):
    """How a request picks its next token."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_STRUCTURED_OUTPUT_CHARS = 100_000  # a spec longer than this is refused before compiling
MAX_SCHEMA_DEPTH = 32  # levels of nested objects/arrays in a JSON schema


def _nesting_depth(value: Any) -> int:
    """Levels of dict/list nesting (iterative: a hostile document cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's ``StructuredOutputsParams``): set exactly one of the fields.

    ``json``: a JSON schema (dict or JSON string); ``regex``: a regular expression the whole output matches;
    ``choice``: a list of strings, the output is exactly one of them; ``grammar``: an EBNF (GBNF) grammar with
    a ``root`` rule; ``json_object=True``: any JSON object. Only the shape is checked here; whether the spec
    compiles is checked when the request is added (a ValueError then too).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                f"got {given or 'none'}."
            )
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (dict or str), got {type(self.json).__name__}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}.")
        if self.choice is not None:
            if isinstance(self.choice, tuple):
                self.choice = list(self.choice)
            if not isinstance(self.choice, list) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a list of strings, got {self.choice!r}.")
            if not self.choice:
                raise ValueError("structured_outputs.choice must not be empty.")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}.")
        self._check_size()

    def _check_size(self) -> None:
        """Bound what a grammar compiler is asked to chew on: a spec too large or a schema too deep is refused. The
        depth comes first: serializing a dict nested thousands deep (for the size) would exhaust the stack."""
        if self.json is not None:
            self._check_schema_depth()
        if len(self.spec_key) > MAX_STRUCTURED_OUTPUT_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} is too large: {len(self.spec_key)} characters, "
                             f"at most {MAX_STRUCTURED_OUTPUT_CHARS}.")

    def _check_schema_depth(self) -> None:
        import json as json_module

        too_deep = ValueError(f"structured_outputs.json is nested too deeply: at most {MAX_SCHEMA_DEPTH} levels.")
        try:
            schema = json_module.loads(self.json) if isinstance(self.json, str) else self.json
        except RecursionError:  # the JSON parser recurses once per level
            raise too_deep from None
        except ValueError:
            return  # not JSON: the compiler reports it with its own message
        if _nesting_depth(schema) > MAX_SCHEMA_DEPTH:
            raise too_deep

    @property
    def kind(self) -> str:
        """Which constraint this is: one of ``STRUCTURED_OUTPUT_KINDS``."""
        return next(name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) not in (None, False))

    @property
    def spec_key(self) -> str:
        """A canonical string of the spec: with ``kind``, the key of the compiled-grammar cache."""
        import json as json_module

        value = getattr(self, self.kind)
        if isinstance(value, str) and self.kind != "choice":
            return value
        return json_module.dumps(value, sort_keys=True)


@dataclass
class SamplingParams:
    """Sampling parameters for text generation, compatible with vLLM's ``SamplingParams``.

    Normalizations done at construction: ``stop`` and ``stop_token_ids`` become lists (``stop_token_ids``
    de-duplicated, order kept); ``top_k=-1`` becomes ``0`` (both mean "disabled"); ``seed=-1`` becomes ``None``;
    ``logit_bias`` keys given as strings (JSON) become ints; temperatures in (1e-5, 1e-2) are raised to 1e-2; a
    greedy request (``temperature < 1e-5``) gets ``top_p=1``, ``top_k=0``, ``min_p=0``. ``logprobs`` /
    ``prompt_logprobs`` = -1 mean the whole vocabulary. ``max_tokens=None`` generates up to the context limit.
    ``top_k`` at or above the vocabulary size keeps every token (it is clamped to the vocabulary, as in vLLM), but must
    fit in int32; ``seed`` must fit in int64; counts must fit in int32; floats must be finite in float32.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self._normalize()
        self._check_ranges()
        if self.is_greedy:
            # Greedy ignores the truncation knobs; reset them so the sampler never sees a half-greedy row.
            # n > 1 stays allowed, as in OpenAI's API: every sequence is the same greedy text (sharing the prompt).
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    # -- validation phases --------------------------------------------------------------------------------------

    def _check_types(self) -> None:
        _check_int("n", self.n)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            _check_finite_number(name, getattr(self, name))
        _check_int("top_k", self.top_k)
        _check_int("min_tokens", self.min_tokens)
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            _check_int(name, getattr(self, name), optional=True)
        for name in (
            "ignore_eos",
            "detokenize",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}.")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}.")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(
                f"structured_outputs must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}."
            )

    def _normalize(self) -> None:
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            setattr(self, name, float(getattr(self, name)))
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:
            self.seed = None
        if SAMPLING_EPS <= self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s; raised to it", self.temperature, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        self.logit_bias = _normalize_logit_bias(self.logit_bias)

    def _check_ranges(self) -> None:
        self._check_representable()
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if self.temperature > MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (disabled), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        self._check_lengths()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < -1:
                raise ValueError(f"{name} must be non-negative or -1 (whole vocabulary), got {value}.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True; set detokenize=True.")

    def _check_representable(self) -> None:
        """Values the engine could not hold in its int32/int64/float32 arrays (the finer ranges come after)."""
        if self.seed is not None and not MIN_INT64 <= self.seed <= MAX_INT64:
            raise ValueError(f"seed must be in [{MIN_INT64}, {MAX_INT64}] (int64), got {self.seed}.")
        for name in ("top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > MAX_INT32:
                raise ValueError(f"{name} must be at most {MAX_INT32}, got {value}.")
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            if abs(getattr(self, name)) > MAX_FLOAT32:
                raise ValueError(f"{name} must be a float32-representable number, got {getattr(self, name)}.")

    def _check_lengths(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )

    # -- queries ------------------------------------------------------------------------------------------------

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def clone(self) -> SamplingParams:
        """A deep copy: the engine may adjust its copy (e.g. per-sequence seeds) without touching the user's."""
        return copy.deepcopy(self)

    def verify_for_vocab(self, vocab_size: int) -> None:
        """Check that every token id named by the request exists in a vocabulary of ``vocab_size`` tokens, and that
        no logprobs count asks for more tokens than it has (``top_k`` above it is allowed: it means "off")."""
        for name, ids in (("logit_bias", self.logit_bias or {}), ("stop_token_ids", self.stop_token_ids or [])):
            invalid = [token_id for token_id in ids if not 0 <= token_id < vocab_size]
            if invalid:
                shown = ", ".join(map(str, invalid[:_MAX_IDS_SHOWN])) + (", ..." if len(invalid) > _MAX_IDS_SHOWN else "")
                raise ValueError(
                    f"{name} contains {len(invalid)} out-of-vocabulary token ids ({shown}); they must be in "
                    f"[0, {vocab_size})."
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > vocab_size:
                raise ValueError(f"{name} must be at most the vocabulary size ({vocab_size}) or -1, got {value}.")


_MAX_IDS_SHOWN = 5  # an error message quotes at most this many offending ids


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value):
        raise ValueError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}.")


def _check_finite_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")


def _normalize_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}.")
    if any(not s for s in stop):
        raise ValueError("stop cannot contain an empty string.")
    return list(stop)


def _normalize_stop_token_ids(ids: Any) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) for i in ids):
        raise ValueError(f"stop_token_ids must be a list of ints, got {ids!r}.")
    if any(not 0 <= i <= MAX_INT32 for i in ids):
        bad = next(i for i in ids if not 0 <= i <= MAX_INT32)
        raise ValueError(f"stop_token_ids must be token ids in [0, {MAX_INT32}], got {bad}.")
    return list(dict.fromkeys(ids))


def _normalize_logit_bias(bias: Any) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}.")
    return {_logit_bias_key(key): _logit_bias_value(key, value) for key, value in bias.items()}


def _logit_bias_key(key: Any) -> int:
    # JSON object keys are strings ("50256"); Python callers pass ints.
    if isinstance(key, str):
        try:
            key = int(key.strip())
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids (ints), got {key!r}.") from None
    if not _is_int(key):
        raise ValueError(f"logit_bias keys must be token ids (ints), got {key!r}.")
    if not 0 <= key <= MAX_INT32:
        raise ValueError(f"logit_bias keys must be token ids in [0, {MAX_INT32}], got {key}.")
    return key


def _logit_bias_value(key: Any, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"logit_bias values must be finite numbers, got {value!r} for token {key!r}.")
    if not -MAX_ABS_LOGIT_BIAS <= value <= MAX_ABS_LOGIT_BIAS:
        raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {key!r}.")
    return float(value)


# -- outputs ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Logprob:
    """The log probability of one token at one position, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the chosen token plus the top-N).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None (nothing predicts the first token), as in vLLM.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with ``n > 1`` has several)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for eos/length

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (``time.time()`` seconds) of a request's life; None until the event happens."""

    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """What the engine returns for a request: its prompt, its completions so far, and whether it is done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # Set when the engine failed this request (its sequences then finish with "abort"): what went wrong, about
    # this request only.
    error: str | None = None


@dataclass(frozen=True)
class BeamSearchParams:
    """Parameters of ``LLM.beam_search`` (as vLLM's)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be a positive integer, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
