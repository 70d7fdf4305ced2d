"""Workloads: nano reproduces nano-vllm's bench.py exactly; the others are seeded; JSON round trip."""

from __future__ import annotations

import statistics

import pytest

from pagedllm.bench.workloads import (
    load_workload,
    make_workload,
    nano_workload,
    random_workload,
    save_workload,
    sharegpt_like_workload,
)


def test_nano_reproduces_nano_vllm_bench():
    workload = make_workload("nano")
    assert len(workload.requests) == 256
    assert workload.num_prompt_tokens == 142_827
    assert workload.num_output_tokens == 133_966
    assert (workload.temperature, workload.ignore_eos) == (0.6, True)
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and 100 <= r.max_tokens <= 1024 for r in workload.requests)
    assert all(0 <= t <= 10000 for r in workload.requests for t in r.prompt_token_ids)
    first = workload.requests[0]
    assert (len(first.prompt_token_ids), first.max_tokens) == (964, 845)


def test_nano_has_a_fixed_size_and_a_prefix():
    with pytest.raises(ValueError, match="--limit"):
        make_workload("nano", num_prompts=10)
    prefix = nano_workload().prefix(3)
    assert prefix.requests == nano_workload().requests[:3]
    assert prefix.params["limit"] == 3 and prefix.summary()["num_requests"] == 3
    with pytest.raises(ValueError, match="limit"):
        nano_workload().prefix(0)


def test_random_workload_has_fixed_lengths_and_is_seeded():
    workload = random_workload(5, input_len=7, output_len=3, seed=1, token_id_bound=50)
    assert [len(r.prompt_token_ids) for r in workload.requests] == [7] * 5
    assert [r.max_tokens for r in workload.requests] == [3] * 5
    assert all(0 <= t <= 50 for r in workload.requests for t in r.prompt_token_ids)
    assert workload == random_workload(5, input_len=7, output_len=3, seed=1, token_id_bound=50)
    assert workload.requests != random_workload(5, input_len=7, output_len=3, seed=2, token_id_bound=50).requests
    with pytest.raises(ValueError, match="input_len"):
        random_workload(5, input_len=0, output_len=3)


def test_sharegpt_like_lengths_follow_the_fit():
    workload = sharegpt_like_workload(2000, seed=0)
    inputs = [len(r.prompt_token_ids) for r in workload.requests]
    outputs = [r.max_tokens for r in workload.requests]
    assert min(inputs) >= 4 and max(inputs) <= 1024 and min(outputs) >= 4 and max(outputs) <= 1024
    assert 120 < statistics.mean(inputs) < 200 and 250 < statistics.mean(outputs) < 380  # fit means 161 / 338
    assert workload == sharegpt_like_workload(2000, seed=0)
    assert workload.requests != sharegpt_like_workload(2000, seed=1).requests


def test_workload_json_round_trip(tmp_path):
    workload = make_workload("sharegpt-like", num_prompts=4, seed=3).prefix(2)
    save_workload(workload, tmp_path / "w.json")
    assert load_workload(tmp_path / "w.json") == workload
    (tmp_path / "bad.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="not a workload file"):
        load_workload(tmp_path / "bad.json")
