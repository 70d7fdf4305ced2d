"""The Ray executor on a local Ray cluster started by the test: tp=2 greedy generations equal tp=1."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import greedy_tokens

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_tp2_equals_single_device(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    expected = greedy_tokens(model_dir)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        got = greedy_tokens(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray")
    finally:
        ray.shutdown()
    assert got == expected
