"""Counted repetitions rewritten as chains of rules: the text of the rewrite, and the same token masks as xgrammar's
own form at every step of random walks (tiny BPE vocabulary; the Qwen3 vocabulary when the shared assets exist)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

from pagedllm.bench.structured import BENCH_SCHEMA
from pagedllm.structured_output.bounded_repeats import has_slow_repeats, rewrite_bounded_repeats
from pagedllm.structured_output.xgrammar_backend import XgrammarBackend, with_fast_repeats
from tests.utils import ASSETS

QWEN3 = ASSETS / "tokenizers" / "qwen3"


def test_rewrite_bounded_repetition_into_a_chain() -> None:
    ebnf = 'root ::= (("\\"" chars{1, 3} "\\""))\nchars ::= (([^\\"\\\\\\r\\n]))\n'
    assert rewrite_bounded_repeats(ebnf) == (
        'root ::= (("\\"" chars_chain0_3))\n'
        'chars ::= (([^\\"\\\\\\r\\n]))\n'
        'chars_chain0_0 ::= ("\\"")\n'
        'chars_chain0_1 ::= ("\\"") | (chars chars_chain0_0)\n'
        'chars_chain0_2 ::= ("\\"") | (chars chars_chain0_1)\n'
        'chars_chain0_3 ::= (chars chars_chain0_2)\n'  # the first character is required
    )


def test_rewrite_minimum_only_repetition() -> None:
    ebnf = 'root ::= ((c{2, -1} "x"))\nc ::= (([a-z]))\n'
    assert rewrite_bounded_repeats(ebnf) == (
        'root ::= ((c_chain0_2))\n'
        'c ::= (([a-z]))\n'
        'c_chain0_0 ::= ("x") | (c c_chain0_0)\n'
        'c_chain0_1 ::= (c c_chain0_0)\n'
        'c_chain0_2 ::= (c c_chain0_1)\n'
    )


def test_one_chain_per_distinct_repetition_and_fresh_names() -> None:
    ebnf = ('root ::= ((c{0, 1} "x" c{0, 1} "x" c{0, 2} "x"))\nc ::= (([a-z]))\n'
            'c_chain0_7 ::= (("taken"))\n')
    rewritten = rewrite_bounded_repeats(ebnf)
    assert rewritten.splitlines()[0] == "root ::= ((c_chain1_1 c_chain1_1 c_chain2_2))"
    assert "c_chain0_7 ::= ((\"taken\"))" in rewritten and "c_chain0_0" not in rewritten


@pytest.mark.parametrize("ebnf", [
    'root ::= (("\\"" c{0, 3} "\\""))\nc ::= (("b") | ("d"))\n',  # not a character class
    'root ::= ((c{0, 3} c))\nc ::= (([a-z]))\n',  # not followed by a literal
    'root ::= Regex("^[a-z]{0, 3} \\"x\\"$")\n',  # inside a string literal
    'root ::= ((c{0, 600} "x"))\nc ::= (([a-z]))\n',  # longer than the chain budget
])
def test_nothing_to_rewrite(ebnf: str) -> None:
    assert rewrite_bounded_repeats(ebnf) is None


def test_chain_budget_is_per_grammar() -> None:
    ebnf = 'root ::= ((c{0, 5} "x" c{0, 9} "y"))\nc ::= (([a-z]))\n'
    rewritten = rewrite_bounded_repeats(ebnf, max_chain_rules=10)
    assert rewritten.splitlines()[0] == 'root ::= ((c_chain0_5 c{0, 9} "y"))'


def test_slow_repeats_are_long_counted_repetitions_of_a_class() -> None:
    assert has_slow_repeats('root ::= ((c{0, 600} "x"))\nc ::= (([a-z]))\n')
    assert has_slow_repeats('root ::= ((c{17, -1} c))\nc ::= (([a-z]))\n')
    assert not has_slow_repeats('root ::= (([1-9] c{3, 3}))\nc ::= (([0-9]))\n')  # short: cheap
    assert not has_slow_repeats('root ::= ((c{0, 600} "x"))\nc ::= (("b") | ("d"))\n')
    assert not has_slow_repeats('root ::= Regex("^[a-z]{0,60}$")\n')


SCHEMAS = {
    "bench": BENCH_SCHEMA,
    "min_and_max": {"type": "string", "minLength": 2, "maxLength": 5},
    "min_only": {"type": "string", "minLength": 3},
    "array_of_bounded": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    "object": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 6}, "b": {"type": "integer"}},
               "required": ["a", "b"], "additionalProperties": False},
}


def grammars(kind: str, spec) -> xgr.Grammar:
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    return xgr.Grammar.from_json_schema(json.dumps(spec), any_whitespace=False)


def masks_along_walks(compiled: xgr.CompiledGrammar, vocab_size: int, seed: int, num_walks: int) -> list[np.ndarray]:
    """The allowed tokens before every token of ``num_walks`` random walks (each drawn among the allowed ones; bits
    past the vocabulary in the last word are left out: xgrammar does not always clear them)."""
    rng, bitmask, masks = random.Random(seed), xgr.allocate_token_bitmask(1, vocab_size), []
    for _ in range(num_walks):
        matcher = xgr.GrammarMatcher(compiled)
        for _ in range(200):
            if matcher.is_terminated():
                break
            matcher.fill_next_token_bitmask(bitmask)
            masks.append(np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size])
            allowed = np.flatnonzero(masks[-1])
            assert matcher.accept_token(int(rng.choice(allowed)))
    return masks


def assert_same_masks(tokenizer, vocab_size: int, grammar: xgr.Grammar, num_walks: int) -> None:
    fast = with_fast_repeats(grammar)
    assert fast is not grammar, "expected a counted repetition to rewrite"
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info)
    reference = masks_along_walks(compiler.compile_grammar(grammar), vocab_size, 0, num_walks)
    rewritten = masks_along_walks(compiler.compile_grammar(fast), vocab_size, 0, num_walks)
    assert len(reference) == len(rewritten)
    for step, (expected, got) in enumerate(zip(reference, rewritten)):
        assert np.array_equal(expected, got), f"masks differ at step {step}"


CASES = [("json", name) for name in SCHEMAS] + [("regex", "[a-z]{0,7}x[0-9]{2,4}")]


@pytest.mark.parametrize("kind,spec", CASES)
def test_same_masks_as_counted_repetitions_tiny_vocab(so_model_dir: str, kind: str, spec: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(so_model_dir)
    grammar = grammars(kind, SCHEMAS.get(spec, spec))
    assert_same_masks(tokenizer, 320, grammar, num_walks=30)


@pytest.mark.skipif(not QWEN3.exists(), reason="needs ../shared/assets")
@pytest.mark.parametrize("kind,spec", [("json", "bench"), ("json", "min_and_max"), ("regex", CASES[-1][1])])
def test_same_masks_as_counted_repetitions_qwen3_vocab(kind: str, spec: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(QWEN3)
    grammar = grammars(kind, SCHEMAS.get(spec, spec))
    assert_same_masks(tokenizer, len(tokenizer), grammar, num_walks=8)


def test_backend_compiles_the_rewritten_grammar(so_model_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(so_model_dir)
    backend = XgrammarBackend(tokenizer, 320, [tokenizer.eos_token_id])
    grammar = backend.parse("json", SCHEMAS["object"])
    assert "_chain0_6" in str(with_fast_repeats(grammar))
    compiled = backend.compile(grammar)

    def accepts(text: str) -> bool:
        matcher = backend.new_matcher(compiled)
        tokens = tokenizer.encode(text) + [tokenizer.eos_token_id]
        return all(matcher.try_accept_token(token) for token in tokens) and matcher.is_terminated()

    assert accepts('{"a": "abcdef", "b": 1}')
    assert not accepts('{"a": "abcdefg", "b": 1}')  # one character over maxLength


def test_grammars_left_with_long_repetitions_have_slow_masks(so_model_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(so_model_dir)
    backend = XgrammarBackend(tokenizer, 320, [tokenizer.eos_token_id])

    def slow_masks(schema: dict) -> bool:
        return backend.new_matcher(backend.compile(backend.parse("json", schema))).slow_masks

    assert not slow_masks(BENCH_SCHEMA)  # every bounded string fits the chain budget
    assert slow_masks({"type": "string", "maxLength": 600})  # over it


def test_padding_ids_are_rejected_without_asking_xgrammar(so_model_dir: str, capfd: pytest.CaptureFixture) -> None:
    tokenizer = AutoTokenizer.from_pretrained(so_model_dir)  # 300 tokens, padded to the model's 320
    backend = XgrammarBackend(tokenizer, 320, [tokenizer.eos_token_id])
    compiled = backend.compile(backend.parse("json_object", True))
    matchers = [backend.new_matcher(compiled) for _ in range(3)]
    brace = tokenizer.convert_tokens_to_ids("{")
    assert backend.try_accept_tokens(matchers, [310, brace, 319]) == [False, True, False]
    assert "cannot accept" not in capfd.readouterr().err
