"""The memory roofline and the measured bandwidth."""

from __future__ import annotations

import pytest

from pagedllm.bench.device import device_name, measure_bandwidth
from pagedllm.bench.roofline import decode_step_roofline_s, ideal_num_steps, kv_tokens_read, roofline


def test_ideal_num_steps_packs_requests_into_slots():
    assert ideal_num_steps([5, 3, 2], max_num_seqs=1) == 10
    assert ideal_num_steps([5, 3, 2], max_num_seqs=2) == 5  # the 2 follows the 3 in its slot
    assert ideal_num_steps([5, 3, 4], max_num_seqs=2) == 7
    assert ideal_num_steps([5, 3, 2], max_num_seqs=256) == 5
    assert ideal_num_steps([], max_num_seqs=4) == 0


def test_roofline_counts_weight_and_kv_bytes():
    assert kv_tokens_read([10], [3]) == 10 + 11 + 12
    bound = roofline([10, 4], [3, 1], max_num_seqs=8, weight_bytes_per_step=1000, kv_bytes_per_token=2,
                     bandwidth_bytes_per_s=100.0)
    assert bound.num_steps == 3 and bound.weight_bytes == 3000
    assert bound.kv_bytes == 2 * (33 + 4)
    assert bound.min_time_s == pytest.approx((3000 + 74) / 100.0)
    assert bound.output_tokens_per_s == pytest.approx(4 / bound.min_time_s)
    assert decode_step_roofline_s(2, 10.5, 1000, 2, 100.0) == pytest.approx((1000 + 42) / 100.0)


def test_cpu_bandwidth_is_measured():
    assert device_name("cpu") == "cpu"
    assert 1e8 < measure_bandwidth("cpu", num_bytes=16 << 20, repeats=2) < 1e13
