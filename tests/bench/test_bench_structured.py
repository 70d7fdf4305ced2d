"""``bench throughput --structured-fraction`` end to end on CPU: a tiny model with random weights and a small
BPE tokenizer given with --tokenizer; half the requests carry the bench schema, and the matched unconstrained run
produces exactly as many output tokens."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagedllm.bench.cli import main
from pagedllm.bench.structured import BENCH_SCHEMA, NUM_ROUNDS, fresh_prompts, structured_flags
from pagedllm.bench.workloads import BenchRequest, Workload
from tests.entrypoints.conftest import save_bpe_tokenizer
from tests.utils import build_tiny_model


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The model's config (run with random weights) and, in another directory, a tokenizer of 300 tokens (the
    model's vocabulary of 320 covers it and the workload's ids)."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("so-bench-model"), "qwen3", vocab_size=320,
                                 max_position_embeddings=1024)
    tokenizer_dir = build_tiny_model(tmp_path_factory.mktemp("so-bench-tokenizer"), "llama", vocab_size=320)
    save_bpe_tokenizer(tokenizer_dir, 300)
    return model_dir, tokenizer_dir


@pytest.mark.slow
def test_structured_fraction_end_to_end(model_and_tokenizer, tmp_path):
    model_dir, tokenizer_dir = model_and_tokenizer
    path = tmp_path / "structured.json"
    assert main(["throughput", "--model", model_dir, "--tokenizer", tokenizer_dir, "--workload", "random",
                 "--num-prompts", "6", "--input-len", "16", "--output-len", "400", "--structured-fraction", "0.5",
                 "--device", "cpu", "--disable-tqdm", "--output-json", str(path)]) == 0
    record = json.loads(path.read_text())
    section = record["structured_outputs"]
    assert section["num_structured_requests"] == 3 and section["schema"] == BENCH_SCHEMA
    assert record["config"]["structured_fraction"] == 0.5
    # Honest counts: the constrained requests ended with their grammar, before max_tokens; the others ran to it.
    assert section["unstructured_output_tokens"] == 3 * 400
    assert 0 < section["structured_output_tokens"] < 3 * 400
    assert record["output_tokens"] == section["structured_output_tokens"] + section["unstructured_output_tokens"]
    assert record["output_tokens_per_s"] == pytest.approx(record["output_tokens"] / record["elapsed_s"])
    matched = section["matched_unconstrained"]
    assert matched["prompt_tokens"] == record["prompt_tokens"] and matched["prefix_cache_hits"] == 0
    # Every round matches its constrained run's token counts; the record's figures are the best round's.
    assert len(section["rounds"]) == NUM_ROUNDS
    for round_ in section["rounds"]:
        assert round_["matched_unconstrained"]["output_tokens"] == round_["constrained"]["output_tokens"]
    best = max(section["rounds"], key=lambda r: r["constrained"]["output_tokens_per_s"])
    assert best["constrained"]["output_tokens_per_s"] == pytest.approx(record["output_tokens_per_s"])
    assert matched["output_tokens_per_s"] == max(r["matched_unconstrained"]["output_tokens_per_s"]
                                                 for r in section["rounds"])
    assert section["throughput_loss"] == pytest.approx(
        1 - record["output_tokens_per_s"] / matched["output_tokens_per_s"])
    draws = section["grammar_draws"]  # every constrained token was drawn one way or the other
    assert draws["masked"] + draws["checked"] == section["structured_output_tokens"]
    assert 0 <= draws["redrawn"] <= draws["checked"]


def test_bench_schema_is_valid_and_flags_spread():
    jsonschema.Draft202012Validator.check_schema(BENCH_SCHEMA)
    assert structured_flags(6, 0.5) == [False, True] * 3
    assert sum(structured_flags(10, 0.3)) == 3 and not any(structured_flags(4, 0.0)) and all(structured_flags(4, 1))


def test_fresh_prompts_keep_shared_prefixes_but_not_first_ids():
    workload = Workload("w", [BenchRequest([5, 1, 2], 4), BenchRequest([5, 1, 3], 4), BenchRequest([7, 9], 4)], 1.0)
    fresh = fresh_prompts(workload)
    assert fresh[0][0] == fresh[1][0] != fresh[2][0] and {fresh[0][0], fresh[2][0]}.isdisjoint({5, 7})
    assert [p[1:] for p in fresh] == [[1, 2], [1, 3], [9]]
    other = fresh_prompts(workload, key=1)  # another round's: first ids used by neither
    assert other[0][0] == other[1][0] and {other[0][0], other[2][0]}.isdisjoint({5, 7, fresh[0][0], fresh[2][0]})


def test_bad_fraction_is_an_error(model_and_tokenizer, capsys):
    assert main(["throughput", "--model", model_and_tokenizer[0], "--structured-fraction", "1.5"]) == 2
    assert "--structured-fraction" in capsys.readouterr().err
