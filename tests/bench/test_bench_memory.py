"""Block sharing and prefix caching, measured: ``bench memory`` (parallel sampling and beam search against independent
requests) and the shared-prefix workload through ``bench throughput``, on CPU with a tiny model."""

from __future__ import annotations

import json

import pytest

from pagedllm.bench.cli import main
from pagedllm.bench.engine_runner import warmup_prompt
from pagedllm.bench.record import RECORD_FIELDS
from pagedllm.bench.workloads import (
    BenchRequest,
    Workload,
    load_workload,
    make_workload,
    save_workload,
    shared_prefix_workload,
)

RUN_FIELDS = ("prefix_caching", "num_steps", "mean_blocks", "peak_blocks", "mean_shared_blocks", "peak_shared_blocks",
              "mean_kv_cache_usage", "peak_kv_cache_usage", "num_sequences", "output_tokens", "elapsed_s",
              "num_preemptions", "prefix_cache_queries", "prefix_cache_hits")


def _record(argv: list[str], path) -> dict:
    assert main([*argv, "--output-json", str(path)]) == 0
    record = json.loads(path.read_text())
    missing = [name for name in RECORD_FIELDS if name not in record]
    assert not missing, f"record lacks {missing}"
    return record


def _check_section(section: dict, copies: int, num_prompts: int) -> None:
    for side in ("sharing", "independent"):
        missing = [name for name in RUN_FIELDS if name not in section[side]]
        assert not missing, f"{side} lacks {missing}"
        assert section[side]["num_preemptions"] == 0 and section[side]["num_steps"] > 0
        assert section[side]["num_sequences"] == copies * num_prompts
    assert section["sharing"]["prefix_caching"] and not section["independent"]["prefix_caching"]
    assert section["independent"]["peak_shared_blocks"] == 0 and section["sharing"]["peak_shared_blocks"] > 0
    assert section["sharing"]["mean_blocks"] < section["independent"]["mean_blocks"]
    assert section["blocks_saved_pct"]["mean"] > 0 and section["blocks_saved_pct"]["peak"] > 0


def test_memory_parallel_sampling_and_beam_search_save_blocks(bench_model_dir, tmp_path):
    record = _record(["memory", "--model", bench_model_dir, "--workload", "random", "--num-prompts", "2",
                      "--input-len", "40", "--output-len", "12"], tmp_path / "memory.json")
    assert (record["bench"], record["device"], record["num_requests"], record["prompt_tokens"]) == (
        "memory", "cpu", 2, 80)
    assert record["config"]["enable_prefix_caching"] == {"sharing": True, "independent": False}
    assert record["num_kv_blocks"] > 0 and record["block_size"] == 16 and record["num_preemptions"] == 0
    parallel, beam = record["parallel_sampling"], record["beam_search"]
    _check_section(parallel, 4, 2)
    _check_section(beam, 4, 2)
    # Seeds s..s+3 of the n=4 request are the independent requests' seeds: the very same work.
    assert parallel["identical_sequences"] == {"identical": 8, "compared": 8}
    assert parallel["sharing"]["output_tokens"] == parallel["independent"]["output_tokens"] == 2 * 4 * 12
    # n == beam width and one output length: beam search's baseline is the same run, measured once.
    assert beam["independent"]["reused_from"] == "parallel_sampling.independent"
    assert beam["sharing"]["output_tokens"] == 2 * 4 * 12 and beam["sharing"]["prefix_cache_hits"] > 0
    # The 40-token prompt holds 2 full blocks that the n=4 sequences share instead of holding 4 copies each.
    assert parallel["independent"]["peak_blocks"] - parallel["sharing"]["peak_blocks"] == 2 * 2 * 3


def test_memory_beam_search_own_baseline_one_output_length_at_a_time(bench_model_dir, tmp_path):
    workload = Workload("two-lengths", [BenchRequest(list(range(5, 41)), 6), BenchRequest(list(range(50, 70)), 9)],
                        temperature=0.8)
    save_workload(workload, tmp_path / "w.json")
    record = _record(["memory", "--model", bench_model_dir, "--workload-json", str(tmp_path / "w.json"),
                      "--modes", "beam-search", "--beam-width", "3"], tmp_path / "beam.json")
    assert "parallel_sampling" not in record and "reused_from" not in record["beam_search"]["independent"]
    _check_section(record["beam_search"], 3, 2)
    assert record["beam_search"]["independent"]["output_tokens"] == 3 * (6 + 9)


def test_shared_prefix_workload():
    workload = shared_prefix_workload(5, prefix_len=20, input_len=7, output_len=3, seed=1, token_id_bound=50)
    prompts = [r.prompt_token_ids for r in workload.requests]
    assert all(len(p) == 27 and p[:20] == prompts[0][:20] for p in prompts)
    assert len({tuple(p[20:]) for p in prompts}) == 5 and all(0 <= t <= 50 for p in prompts for t in p)
    assert [r.max_tokens for r in workload.requests] == [3] * 5 and workload.params["prefix_len"] == 20
    assert workload == make_workload("shared-prefix", 5, input_len=7, output_len=3, seed=1, token_id_bound=50,
                                     prefix_len=20)
    assert workload.requests != shared_prefix_workload(5, 20, 7, 3, seed=2, token_id_bound=50).requests
    with pytest.raises(ValueError, match="prefix_len"):
        shared_prefix_workload(5, prefix_len=0, input_len=7, output_len=3)


def test_shared_prefix_json_round_trip(tmp_path):
    workload = make_workload("shared-prefix", 3, input_len=4, output_len=2, prefix_len=9)
    save_workload(workload, tmp_path / "w.json")
    assert load_workload(tmp_path / "w.json") == workload


def test_warmup_prompt_starts_unlike_every_workload_prompt():
    workload = shared_prefix_workload(4, prefix_len=32, input_len=4, output_len=2, token_id_bound=3)
    prompt = warmup_prompt(workload)
    assert len(prompt) == 16 and prompt[0] != workload.requests[0].prompt_token_ids[0] and 0 <= prompt[0] <= 3
    assert prompt[1:] == workload.requests[0].prompt_token_ids[1:16]


def test_throughput_shared_prefix_with_and_without_prefix_caching(bench_model_dir, tmp_path):
    argv = ["throughput", "--model", bench_model_dir, "--workload", "shared-prefix", "--num-prompts", "4",
            "--prefix-len", "48", "--input-len", "8", "--output-len", "3", "--disable-tqdm"]
    on = _record([*argv, "--enable-prefix-caching"], tmp_path / "on.json")
    off = _record([*argv, "--no-enable-prefix-caching"], tmp_path / "off.json")
    assert on["workload"]["name"] == "shared-prefix" and on["prompt_tokens"] == off["prompt_tokens"] == 4 * 56
    # With caching on, the 3 later prompts find the prefix's 3 full blocks; the warm-up left nothing they could hit.
    assert on["prefix_cache_hits"] == 3 * 48 and on["prefix_cache_hit_rate"] == pytest.approx(144 / 224)
    assert on["prompt_tokens_computed"] == 224 - 144
    assert off["prefix_cache_hit_rate"] == 0 and off["prompt_tokens_computed"] == 224
    for record in (on, off):
        for stats in (record["ttft"], record["tpot"]):  # 3 output tokens each: every request has a TPOT
            assert 0 < stats["p50_s"] <= stats["p99_s"] and stats["mean_s"] > 0
