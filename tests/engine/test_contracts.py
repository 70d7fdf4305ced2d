"""Every front end <-> engine core message survives encode + decode unchanged (msgspec msgpack)."""

from __future__ import annotations

import pytest

from pagedllm.core.interface import TopLogprobs
from pagedllm.engine.contracts import (
    AbortRequests,
    AddRequests,
    CoreReady,
    CoreStartupFailed,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    GrammarPrepared,
    MessageCodec,
    PrepareGrammar,
    RemoveLoRA,
    SchedulerStats,
    ShutdownCore,
    UtilityCall,
    UtilityResult,
)
from pagedllm.params import RequestOutputKind, SamplingParams, StructuredOutputsParams


def rich_params() -> SamplingParams:
    return SamplingParams(n=1, temperature=0.7, top_k=5, seed=3, stop=["\n\n", "END"], stop_token_ids=[7, 9],
                          logit_bias={5: 1.5, 12: -100.0}, logprobs=2, prompt_logprobs=1, min_tokens=2,
                          output_kind=RequestOutputKind.DELTA,
                          structured_outputs=StructuredOutputsParams(json={"type": "object", "required": ["a"]}))


def core_request(request_id: str = "0_r1", **overrides) -> EngineCoreRequest:
    fields = dict(request_id=request_id, prompt_token_ids=[1, 2, 3], sampling_params=rich_params(),
                  sampling_seed=2**62, max_tokens=16, arrival_time=12.5, priority=-3, fork_source="0_r0")
    return EngineCoreRequest(**{**fields, **overrides})


FRONT_TO_CORE = [
    AddRequests([core_request(), core_request("1_r1", fork_source=None, sampling_params=SamplingParams())]),
    AddRequests([core_request(sampling_params=SamplingParams(
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"])))]),
    AddRequests([core_request(sampling_params=SamplingParams(
        structured_outputs=StructuredOutputsParams(regex="[a-z]+")))]),
    AddRequests([core_request("a2-r1")], front_end=2),  # from the third of several API server processes
    AbortRequests(["a", "b"]),
    AbortRequests(["a"], stopped=True),
    RemoveLoRA(7),
    UtilityCall(7, "num_unfinished_requests"),
    UtilityCall(8, "echo", [1, "two", [3.0]]),
    UtilityCall(8, "echo", [1], front_end=3),
    PrepareGrammar(9, StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}}), "10.0.0.1"),
    PrepareGrammar(10, StructuredOutputsParams(regex="[a-z]+")),
    PrepareGrammar(10, StructuredOutputsParams(regex="[a-z]+"), front_end=1),
    ShutdownCore(),
]

CORE_TO_FRONT = [
    EngineCoreOutputs(
        [
            EngineCoreOutput("r1", [5]),
            EngineCoreOutput("r2", [6], new_logprobs=TopLogprobs([6, 1], [-0.1, -2.0], [1, 2]),
                             new_prompt_logprobs=[TopLogprobs([3], [-1.0], [4])], finish_reason="stop",
                             stop_reason=6, num_preemptions=2),
            EngineCoreOutput("r3", [], finish_reason="stop", stop_reason="END"),
            EngineCoreOutput("r4", [], finish_reason="abort", error="ValueError: bad"),
        ],
        timestamp=100.25,
        scheduler_stats=SchedulerStats(num_running=3, kv_cache_usage=0.5, prefix_cache_hits=9),
        engine_fault="steps keep failing",
        first_scheduled_times={"r1": 99.5},
        utility_results=[UtilityResult(7, 3), UtilityResult(8, error="no utility method 'echo'"),
                         UtilityResult(8, 4, front_end=2)],
        grammar_results=[GrammarPrepared(9), GrammarPrepared(10, "queue_full", "too many grammars"),
                         GrammarPrepared(10, front_end=1)],
    ),
    EngineCoreOutputs([], timestamp=1.0),
    CoreReady(num_blocks=2048, max_model_len=1024, startup_report={"num_gpu_blocks": 2048, "seconds": {"load": 0.2}}),
    CoreStartupFailed("ValueError: The KV cache holds 16 tokens"),
]


@pytest.mark.parametrize("message", FRONT_TO_CORE, ids=lambda m: type(m).__name__)
def test_front_to_core_messages_round_trip(message):
    codec = MessageCodec()
    decoded = codec.decode_front_to_core(codec.encode(message))
    assert type(decoded) is type(message) and decoded == message


@pytest.mark.parametrize("message", CORE_TO_FRONT, ids=lambda m: type(m).__name__)
def test_core_to_front_messages_round_trip(message):
    codec = MessageCodec()
    decoded = codec.decode_core_to_front(codec.encode(message))
    assert type(decoded) is type(message) and decoded == message


def test_sampling_params_keep_their_types():
    """Int logit_bias keys, the output-kind enum and the nested spec come back as they went, not as strings/ints."""
    codec = MessageCodec()
    decoded = codec.decode_front_to_core(codec.encode(AddRequests([core_request()]))).requests[0].sampling_params
    assert decoded == rich_params()
    assert all(isinstance(key, int) for key in decoded.logit_bias)
    assert decoded.output_kind is RequestOutputKind.DELTA
    assert isinstance(decoded.structured_outputs, StructuredOutputsParams)
    assert decoded.structured_outputs.kind == "json"


def test_a_finished_output_says_so():
    assert EngineCoreOutput("r", [1], finish_reason="length").finished
    assert not EngineCoreOutput("r", [1]).finished


def test_a_prepared_schema_keeps_its_property_order():
    """The core's cache key and the compiled grammar depend on the schema's property order."""
    codec = MessageCodec()
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"z": {}, "a": {}, "m": {}}})
    decoded = codec.decode_front_to_core(codec.encode(PrepareGrammar(1, spec)))
    assert list(decoded.spec.json["properties"]) == ["z", "a", "m"]
    assert decoded.spec.spec_key == spec.spec_key
