"""The split-K launch planning shared by the decode GEMM kernels (``model/split_k.py``), on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.split_k import COUNTERS_PER_DEVICE, arrival_counters, even_split, plan_launch, sm_count


@pytest.mark.parametrize(("k_steps", "wanted", "min_steps", "expected"), [
    (32, 8, 4, 8),  # 8 slices of 4 steps
    (32, 7, 4, 4),  # 7 does not divide 32: the most that does below it
    (32, 16, 4, 8),  # at least 4 steps a slice
    (13, 8, 2, 1),  # a prime: no even split
    (3, 8, 4, 1),  # fewer steps than one slice's minimum
])
def test_even_split_takes_the_most_even_slices(k_steps: int, wanted: int, min_steps: int, expected: int) -> None:
    assert even_split(k_steps, wanted, min_steps) == expected


def test_plan_splits_k_in_whole_steps_and_drops_empty_slices() -> None:
    out = torch.empty(1, 70)
    launch = plan_launch(70, 200, out, block_n=16, block_k=32, block_m=16, split_k=8)  # 7 steps: 7 slices of one
    assert (launch.grid, launch.k_per_split, launch.is_split, launch.even_k) == ((5, 7), 32, True, False)
    assert launch.partials.shape == (7, 80, 16) and launch.arrivals is arrival_counters(out.device)


@pytest.mark.parametrize(("n", "split_k", "can_split"), [
    (70, 1, True),  # one slice asked
    (70, 4, False),  # the caller needs whole rows
    (16 * (COUNTERS_PER_DEVICE + 1), 4, True),  # more row blocks than counters
])
def test_plan_without_split_covers_k_in_one_slice(n: int, split_k: int, can_split: bool) -> None:
    out = torch.empty(1, n)
    launch = plan_launch(n, 256, out, block_n=16, block_k=64, block_m=16, split_k=split_k, can_split=can_split)
    assert (launch.num_splits, launch.k_per_split, launch.is_split, launch.even_k) == (1, 256, False, True)
    assert launch.partials is out and launch.arrivals is out  # placeholders, never touched


def test_counters_start_zeroed_and_sm_count_off_cuda() -> None:
    counters = arrival_counters(torch.device("cpu"))
    assert counters.shape == (COUNTERS_PER_DEVICE,) and counters.dtype == torch.int32 and not counters.any()
    assert sm_count(torch.device("cpu")) == 8
