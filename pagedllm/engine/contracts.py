"""The messages between the front end (API server: tokenize, detokenize, stream) and the engine core (scheduler +
executor), which may run in another process. Plain data only: no ``Request``, grammar object, tokenizer or tensor.

Several front ends (``serve --api-server-count N``: N API server processes) may share one core: each message that
asks for an answer carries its sender's ``front_end`` index (0 when there is one), and the core sends each request's
outputs, and each answer, to the front end it came from (``core_routing.FrontEndRoutes``).

Front end -> core: ``AddRequests`` (the sequences of one request, as ``EngineCoreRequest``), ``AbortRequests``,
``RemoveLoRA``, ``UtilityCall``, ``PrepareGrammar``, ``ShutdownCore``. Core -> front end: ``CoreReady`` or ``CoreStartupFailed`` once (the handshake),
then ``EngineCoreOutputs`` after every step that produced outputs, and as a heartbeat while idle.

Serialization: msgspec msgpack, with the hot messages as ``msgspec.Struct`` (``array_like``: no field names on the
wire). Measured on this repository's 2-core CPU box, encode + decode of one step of 256 single-token outputs:
Structs with msgspec 133 us, the same Structs with pickle protocol 5 440-490 us, slots dataclasses with msgspec
407 us, with pickle 1390 us. So msgspec, and ``EngineCoreOutput`` / ``TopLogprobs`` became Structs (they are
built by the scheduler and the sampler as before: same fields, keyword or positional). Pickle's out-of-band
buffers would only pay for large arrays, which none of these messages carry. ``SamplingParams`` stays a dataclass
(msgspec round-trips it with its nested ``StructuredOutputsParams``, ``logit_bias`` int keys and enums; decoding
re-runs its ``__post_init__`` checks, which valid values pass unchanged); it travels once per request.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

# The step outputs are made by the scheduler (core/), which may not import engine/: defined there, sent from here.
from pagedllm.core.interface import EngineCoreOutput, SchedulerStats, TopLogprobs  # noqa: F401 - re-exported
from pagedllm.lora.request import LoRARequest
from pagedllm.params import SamplingParams, StructuredOutputsParams
from pagedllm.pooling.params import PoolingParams


# ---- front end -> core -------------------------------------------------------------------------------------------


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sequence to generate. The structured-output spec (if any) is ``sampling_params.structured_outputs``:
    the core compiles it and owns the grammar objects."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    sampling_seed: int
    max_tokens: int  # resolved: params.max_tokens, or the rest of the context
    arrival_time: float  # time.monotonic() of the front end (system-wide on Linux, so the core's clock agrees)
    priority: int = 0
    fork_source: str | None = None  # another sequence of the same prompt whose KV blocks this one starts from
    lora_request: LoRARequest | None = None  # the adapter to run with (validated by the front end); None = base
    pooling_params: PoolingParams | None = None  # an embedding request (resolved): pooled, never sampled


class AddRequests(msgspec.Struct, tag=True, array_like=True):
    """The sequences of one request (one per ``n``), added together so that they share one grammar compile."""

    requests: list[EngineCoreRequest]
    front_end: int = 0  # who sent them: their outputs go back there


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    """Finish sequences from outside the step: aborted, or ``stopped`` by a stop string the front end found."""

    request_ids: list[str]
    stopped: bool = False


class RemoveLoRA(msgspec.Struct, tag=True, array_like=True):
    """An adapter was unloaded (the server's ``/v1/unload_lora_adapter``): once no request of the core runs with
    it, every worker drops its weights (GPU slot and CPU cache). Requests already running with it finish first."""

    lora_int_id: int


class UtilityCall(msgspec.Struct, tag=True, array_like=True):
    """Call one of the core's utility methods (``EngineCore.UTILITY_METHODS``); the answer is a ``UtilityResult``."""

    call_id: int
    method: str
    args: list[Any] = []
    front_end: int = 0  # who asks: the answer goes back there (call ids are each front end's own)


class PrepareGrammar(msgspec.Struct, tag=True, array_like=True):
    """Compile a spec ahead of its request (the server's early check) in the core's compile pool, which is the only
    one: the compiled grammar stays in the core's cache for the request that follows. Answered, once the compile
    has finished, by a ``GrammarPrepared`` with the same call id; the core does not wait for it meanwhile."""

    call_id: int
    spec: StructuredOutputsParams
    client_id: str | None = None  # whose per-client pending limit the compile counts against
    front_end: int = 0  # the API server process that asks: the answer goes back there


class ShutdownCore(msgspec.Struct, tag=True, array_like=True):
    """Stop stepping and exit (requests still in flight are dropped: the front end has failed them)."""


FrontToCore = Union[AddRequests, AbortRequests, RemoveLoRA, UtilityCall, PrepareGrammar, ShutdownCore]


# ---- core -> front end -------------------------------------------------------------------------------------------


class UtilityResult(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: str | None = None
    front_end: int = 0  # the caller's (see ``UtilityCall``)


class GrammarPrepared(msgspec.Struct, array_like=True, omit_defaults=True):
    """The answer to ``PrepareGrammar``: compiled (``error_kind`` None), or why not. ``error_kind`` is one of
    ``GRAMMAR_ERROR_KINDS`` so that the front end raises the exception type the manager raised (the server's 400 /
    429 / 503 depend on it)."""

    call_id: int
    error_kind: str | None = None
    error: str | None = None
    front_end: int = 0  # the caller's (see ``PrepareGrammar``)


# GrammarPrepared.error_kind: "invalid" (ValueError: a bad spec, a compile past its deadline), "queue_full"
# (GrammarQueueFull), "abandoned" (GrammarCompileAbandoned: shutting down), "internal" (anything else).
GRAMMAR_ERROR_KINDS = ("invalid", "queue_full", "abandoned", "internal")


class EngineCoreOutputs(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """One step's outputs and what the front end's metrics and health need."""

    outputs: list[EngineCoreOutput]
    timestamp: float  # time.monotonic() when the core sent this (liveness)
    scheduler_stats: SchedulerStats | None = None
    engine_fault: str | None = None  # steps keep failing with no request to blame
    # Core request id -> time.monotonic() it was first scheduled, reported with its first output (queue time).
    first_scheduled_times: dict[str, float] = {}
    utility_results: list[UtilityResult] = []
    grammar_results: list[GrammarPrepared] = []


class CoreReady(msgspec.Struct, tag=True, array_like=True):
    """The handshake: the core is built; what the front end needs from it."""

    num_blocks: int
    max_model_len: int
    startup_report: dict[str, Any]


class CoreStartupFailed(msgspec.Struct, tag=True, array_like=True):
    """The core could not start (bad model path, KV cache too small...): the message for the user."""

    error: str


CoreToFront = Union[EngineCoreOutputs, CoreReady, CoreStartupFailed]


class MessageCodec:
    """Encoders and decoders for both directions (reuse one per socket: msgspec caches type information)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._front_to_core = msgspec.msgpack.Decoder(FrontToCore)
        self._core_to_front = msgspec.msgpack.Decoder(CoreToFront)

    def encode(self, message: Any) -> bytes:
        return self._encoder.encode(message)

    def decode_front_to_core(self, data: bytes) -> FrontToCore:
        return self._front_to_core.decode(data)

    def decode_core_to_front(self, data: bytes) -> CoreToFront:
        return self._core_to_front.decode(data)
