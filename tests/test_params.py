"""SamplingParams validation and normalization; the output records."""

from __future__ import annotations

import math
import sys

import pytest

from pagedllm.params import (
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    SamplingType,
)

# (keyword arguments, the field the error message must name)
INVALID = [
    ({"n": 0}, "n"),
    ({"n": 1.0}, "n"),
    ({"n": True}, "n"),
    ({"n": 16385}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"presence_penalty": "1"}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "42"}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"stop": ["a", 3]}, "stop"),
    ({"stop": "x", "detokenize": False}, "stop"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"detokenize": "yes"}, "detokenize"),
    ({"skip_special_tokens": None}, "skip_special_tokens"),
    ({"spaces_between_special_tokens": 0}, "spaces_between_special_tokens"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 1.0}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"),  # > max_tokens=16
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": -2}, "logprobs"),
    ({"logprobs": 1.0}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"prompt_logprobs": -3}, "prompt_logprobs"),
    ({"prompt_logprobs": "5"}, "prompt_logprobs"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": {1.5: 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
    ({"logit_bias": {1: 101.0}}, "logit_bias"),
    ({"logit_bias": {1: -100.5}}, "logit_bias"),
    ({"logit_bias": {1: math.inf}}, "logit_bias"),
    ({"logit_bias": {1: math.nan}}, "logit_bias"),
    ({"logit_bias": {1: "2"}}, "logit_bias"),
    ({"logit_bias": {1: True}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    # Values the engine could not represent (int32 counts, int64 seeds, float32 floats): rejected here, never
    # raised inside the engine step for the whole batch.
    ({"top_k": 9223372036854775808}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 2**31}, "max_tokens"),
    ({"min_tokens": 2**31, "max_tokens": None}, "min_tokens"),
    ({"logprobs": 2**31}, "logprobs"),
    ({"prompt_logprobs": 2**40}, "prompt_logprobs"),
    ({"repetition_penalty": 1e39}, "repetition_penalty"),
    ({"logit_bias": {2**40: 1.0}}, "logit_bias"),
    ({"logit_bias": {str(2**70): 1.0}}, "logit_bias"),
    ({"stop_token_ids": [2**33]}, "stop_token_ids"),
]


@pytest.mark.parametrize(("kwargs", "field"), INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_value_raises_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(field), str(info.value)


def test_error_message_shape() -> None:
    with pytest.raises(ValueError, match=r"^temperature must be non-negative, got -1.0.$"):
        SamplingParams(temperature=-1.0)


VALID_EDGES = [
    {"n": 1},
    {"n": 16384},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"presence_penalty": 2, "frequency_penalty": -2},  # ints are numbers too
    {"repetition_penalty": 1e-3},
    {"repetition_penalty": 10.0},
    {"temperature": 0.0},
    {"temperature": 0},
    {"temperature": 2.0},
    {"top_p": 1e-9},
    {"top_p": 1.0},
    {"top_k": -1},
    {"top_k": 0},
    {"top_k": 1},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"seed": 0},
    {"seed": -1},
    {"seed": sys.maxsize},
    {"seed": 2**63 - 1},
    {"seed": -(2**63)},
    {"top_k": 2**31 - 1},  # at or above the vocabulary size: keeps every token
    {"max_tokens": 2**31 - 1},
    {"max_tokens": None},
    {"max_tokens": 1},
    {"min_tokens": 16},
    {"min_tokens": 1000, "max_tokens": None},
    {"logprobs": 0},
    {"logprobs": -1},
    {"prompt_logprobs": 0},
    {"prompt_logprobs": -1},
    {"logit_bias": {}},
    {"logit_bias": {0: -100, 1: 100.0}},
    {"stop": [], "stop_token_ids": []},
]


@pytest.mark.parametrize("kwargs", VALID_EDGES)
def test_valid_edges_pass(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert not p.ignore_eos and p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.include_stop_str_in_output
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy


def test_stop_normalized_to_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_stop_token_ids_deduplicated_in_order() -> None:
    assert SamplingParams(stop_token_ids=[5, 3, 5, 1]).stop_token_ids == [5, 3, 1]
    assert SamplingParams(stop_token_ids=(7,)).stop_token_ids == [7]


def test_logit_bias_string_keys_become_ints() -> None:
    p = SamplingParams(logit_bias={"50256": -100, "7": 2.5, 3: 1})
    assert p.logit_bias == {50256: -100.0, 7: 2.5, 3: 1.0}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())


def test_disabled_values_normalized() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(seed=-1).seed is None


def test_greedy() -> None:
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2)
    assert p.is_greedy and p.sampling_type is SamplingType.GREEDY
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)  # truncation knobs are meaningless when greedy
    assert SamplingParams(temperature=9e-6).is_greedy
    assert SamplingParams(n=3, temperature=0.0).n == 3  # n greedy copies, as OpenAI answers
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_tiny_temperature_raised_to_minimum() -> None:
    assert SamplingParams(temperature=1e-3).temperature == 1e-2
    assert SamplingParams(temperature=0.5).temperature == 0.5


def test_seeded_sampling_type() -> None:
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED


def test_clone_is_deep() -> None:
    p = SamplingParams(stop=["x"], logit_bias={1: 1.0})
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.logit_bias[2] = 2.0
    assert p.stop == ["x"] and p.logit_bias == {1: 1.0}


def test_verify_for_vocab() -> None:
    SamplingParams(logit_bias={0: 1.0, 99: -1.0}, stop_token_ids=[0, 99]).verify_for_vocab(100)
    with pytest.raises(ValueError, match=r"^logit_bias"):
        SamplingParams(logit_bias={100: 1.0}).verify_for_vocab(100)
    with pytest.raises(ValueError, match=r"^stop_token_ids"):
        SamplingParams(stop_token_ids=[3, 100]).verify_for_vocab(100)
    SamplingParams(logprobs=100, prompt_logprobs=-1, top_k=10**6).verify_for_vocab(100)
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=rf"^{name} must be at most the vocabulary size \(100\)"):
            SamplingParams(**{name: 101}).verify_for_vocab(100)


def test_verify_for_vocab_quotes_a_bounded_number_of_ids() -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(stop_token_ids=list(range(100, 10_100))).verify_for_vocab(100)
    assert "10000 out-of-vocabulary" in str(info.value) and len(str(info.value)) < 200


def test_output_records() -> None:
    lp = Logprob(-0.5, rank=1, decoded_token="a")
    assert not hasattr(lp, "__dict__")  # slots: one is made per token
    running = CompletionOutput(0, "a", [5], cumulative_logprob=-0.5, logprobs=[{5: lp}])
    done = CompletionOutput(1, "ab", [5, 6], finish_reason="stop", stop_reason=6)
    assert not running.finished() and done.finished()
    out = RequestOutput("r0", "hi", [1, 2], [None, {2: Logprob(-1.0)}], [running, done], finished=False)
    assert out.metrics is None and out.prompt_logprobs[0] is None
    assert RequestMetrics().arrival_time is None


def _nested_dict(depth: int) -> dict:
    root: dict = {}
    node = root
    for _ in range(depth):
        node["properties"] = {}
        node = node["properties"]
    return root


@pytest.mark.parametrize("schema", [
    "[" * 49_000 + "]" * 49_000,  # a string the JSON parser would recurse into
    _nested_dict(5_000),  # a dict that json.dumps would recurse into
    _nested_dict(40),
])
def test_deeply_nested_json_schemas_are_value_errors(schema) -> None:
    """Never a RecursionError (a 500 on the server): a ValueError naming the field."""
    from pagedllm.params import StructuredOutputsParams

    with pytest.raises(ValueError, match="structured_outputs.json is nested too deeply"):
        StructuredOutputsParams(json=schema)
