"""End to end with a tiny random model: the grammar, not the model, guarantees the outputs' shape."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from pagedllm.structured_output.bounded_repeats import MAX_CHAIN_RULES

SCHEMAS = {
    "nested_required": {
        "type": "object",
        "properties": {
            # xgrammar's JSON strings admit raw control characters (which strict JSON rejects): a pattern keeps
            # random-weight outputs parseable by json.loads.
            "name": {"type": "string", "pattern": "^[A-Za-z ]{1,6}$"},
            "address": {
                "type": "object",
                "properties": {"zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                "required": ["zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
            "ok": {"type": "boolean"},
        },
        "required": ["tags", "ok"],
        "additionalProperties": False,
    },
    "integer_range_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 250},
        "minItems": 2,
        "maxItems": 5,
    },
}


def _generate(llm: LLM, structured: StructuredOutputsParams, n: int = 50, **kwargs) -> list:
    kwargs = {"temperature": 1.0, "seed": 1234, "max_tokens": 120, **kwargs}
    params = SamplingParams(n=n, structured_outputs=structured, **kwargs)
    (output,) = llm.generate(["Output:"], params, use_tqdm=False)
    return output.outputs


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(llm: LLM, name: str):
    schema = SCHEMAS[name]
    outputs = _generate(llm, StructuredOutputsParams(json=schema))
    assert len(outputs) == 50
    for completion in outputs:
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), schema)
    assert len({c.text for c in outputs}) > 1  # sampled, not one forced string


def test_json_object_outputs_parse(llm: LLM):
    outputs = _generate(llm, StructuredOutputsParams(json_object=True), n=10, max_tokens=200)
    for completion in outputs:
        if completion.finish_reason == "stop":  # any JSON may be long: only finished ones must parse
            json.loads(completion.text, strict=False)  # strict=False: raw control characters in strings
        else:
            assert completion.text.lstrip().startswith(("{", "["))


def test_regex_outputs_full_match(llm: LLM):
    pattern = r"[a-z]{3}-\d{2,4}(\.[A-Z])?"
    for completion in _generate(llm, StructuredOutputsParams(regex=pattern)):
        assert completion.finish_reason == "stop"
        assert re.fullmatch(pattern, completion.text), completion.text


def test_choice_outputs_are_choices_greedy_and_random(llm: LLM):
    choices = ["yes", "no", "maybe so", 'say "hi"']
    outputs = _generate(llm, StructuredOutputsParams(choice=choices))
    assert {c.text for c in outputs} <= set(choices)
    (greedy,) = llm.generate(
        ["Output:"], SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(choice=choices)),
        use_tqdm=False,
    )
    assert greedy.outputs[0].text in choices and greedy.outputs[0].finish_reason == "stop"


# Sums of 1-2 digit numbers with optional parentheses, at most 3 terms per level.
GRAMMAR = r"""
root ::= expr
expr ::= term ("+" term){0,2}
term ::= num | "(" num ("+" num){0,2} ")"
num ::= [0-9] | [1-9] [0-9]
"""


def _parses(text: str) -> bool:
    """A small recursive-descent check of GRAMMAR."""
    num = r"(?:[0-9]|[1-9][0-9])"
    term = rf"(?:{num}|\({num}(?:\+{num}){{0,2}}\))"
    return re.fullmatch(rf"{term}(?:\+{term}){{0,2}}", text) is not None


def test_ebnf_grammar_outputs_parse(llm: LLM):
    for completion in _generate(llm, StructuredOutputsParams(grammar=GRAMMAR)):
        assert completion.finish_reason == "stop"
        assert _parses(completion.text), completion.text


def test_stop_string_still_applies(llm: LLM):
    (output,) = llm.generate(
        ["Output:"],
        SamplingParams(temperature=0, stop=["-"], structured_outputs=StructuredOutputsParams(choice=["abc-def"])),
        use_tqdm=False,
    )
    assert output.outputs[0].text == "abc" and output.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "structured, message",
    [
        (dict(json="{not json"), "structured_outputs.json is invalid"),
        (dict(json={"type": "no-such-type"}), "structured_outputs.json is invalid"),
        (dict(regex="a(b"), "structured_outputs.regex is invalid"),
        (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar is invalid"),
    ],
)
def test_bad_specs_raise_value_error_at_add_time(llm: LLM, structured: dict, message: str):
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**structured))
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(["Output:"], params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_deep_but_allowed_schema_is_accepted():
    StructuredOutputsParams(json=_nested_schema(10))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        (dict(regex="a", choice=["a"]), "exactly one of"),
        (dict(choice=[]), "choice must not be empty"),
        (dict(choice=[1, 2]), "choice must be a list of strings"),
        (dict(regex=""), "regex must be a non-empty string"),
        (dict(regex="a" * 100_001), "regex is too large"),
        (dict(json=_nested_schema(40)), "nested too deeply"),
        (dict(json=json.dumps(_nested_schema(40))), "nested too deeply"),
    ],
)
def test_params_validation(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_unconstrained_rows_are_unaffected_in_a_mixed_batch(llm: LLM):
    prompts = ["Once upon a time", "The quick brown fox", "Paged attention"]
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    constrained = SamplingParams(
        temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=SCHEMAS["array_enum"])
    )
    mixed_prompts = [prompts[0], "Output:", prompts[1], "Output:", prompts[2]]
    mixed_params = [plain, constrained, plain, constrained, plain]
    mixed = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 4)] == alone
    for i in (1, 3):
        jsonschema.validate(json.loads(mixed[i].outputs[0].text), SCHEMAS["array_enum"])


@pytest.mark.parametrize("temperature, n", [(1.0, 16), (0.0, 1)])
def test_checking_draws_gives_the_tokens_of_masking_every_draw(
    llm: LLM, temperature: float, n: int, monkeypatch: pytest.MonkeyPatch
):
    """Rows checked after their draw (worker/grammar_sampling.py: rows of grammars with slow masks) get exactly the
    tokens and logprobs of masking every row before its draw."""
    # Over the chain budget: the bounded string keeps xgrammar's counted repetition, so its grammar has slow masks.
    # (Grammars compile in worker processes, so the budget cannot be patched here.)
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": MAX_CHAIN_RULES + 20 + n},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["word", "n"], "additionalProperties": False}
    structured = StructuredOutputsParams(json=schema)
    runner = llm.llm_engine.engine_core.model_runner

    def draws() -> tuple[int, int]:
        grammar_sampling = runner.grammar_sampling
        return (grammar_sampling.num_checked, grammar_sampling.num_redrawn) if grammar_sampling else (0, 0)

    before = draws()
    checked = _generate(llm, structured, n=n, temperature=temperature, logprobs=2)
    grammar_sampling = runner.grammar_sampling
    assert grammar_sampling.num_checked > before[0] and grammar_sampling.num_redrawn > before[1]
    grammar_sampling.check_draws = False
    try:
        num_checked = grammar_sampling.num_checked
        masked = _generate(llm, structured, n=n, temperature=temperature, logprobs=2)
        assert grammar_sampling.num_checked == num_checked
    finally:
        grammar_sampling.check_draws = True
    assert [c.token_ids for c in checked] == [c.token_ids for c in masked]
    for a, b in zip(checked, masked):
        for position_a, position_b in zip(a.logprobs, b.logprobs):
            assert position_a.keys() == position_b.keys()
            for token_id, logprob in position_a.items():
                assert logprob.logprob == pytest.approx(position_b[token_id].logprob, abs=1e-5)
                assert logprob.rank == position_b[token_id].rank


def test_matcher_survives_preemption_by_recompute(so_model_dir: str):
    # 64 blocks of 4 tokens for 24 sequences of ~60 tokens: preemptions (by recompute) are certain.
    llm = LLM(so_model_dir, device="cpu", block_size=4, num_gpu_blocks_override=64, max_model_len=256,
              max_num_seqs=24, preemption_mode="recompute", enable_prefix_caching=False)
    schema = SCHEMAS["nested_required"]
    outputs = _generate(llm, StructuredOutputsParams(json=schema), n=24)
    assert llm.llm_engine.engine_core.scheduler.num_preemptions_total > 0
    for completion in outputs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), schema)


def test_a_grammar_ends_its_request_at_its_stop_token_with_ignore_eos(llm: LLM):
    """With ``ignore_eos`` only the grammar ends the request: at the step of its stop token, not one later (the
    runner advances grammars by most tokens one step late, never by a stop token)."""
    schema = SCHEMAS["array_enum"]
    outputs = _generate(llm, StructuredOutputsParams(json=schema), n=16, ignore_eos=True)
    eos = llm.get_tokenizer().eos_token_id
    for completion in outputs:
        assert completion.finish_reason == "stop", completion
        assert completion.token_ids.count(eos) <= 1 and completion.token_ids[-1] == eos, completion.token_ids
        jsonschema.validate(json.loads(completion.text), schema)
