"""The Ray executor on a local Ray cluster started by the test: tp=2 and pp=2 (two steps in flight, each actor running
its calls in submission order) greedy generations equal tp=1."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import greedy_tokens

ray = pytest.importorskip("ray")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_ray_parallel_equals_single_device(tiny_model_dir, parallel):
    model_dir = tiny_model_dir("llama")
    expected = greedy_tokens(model_dir)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        got = greedy_tokens(model_dir, **parallel, distributed_executor_backend="ray")
    finally:
        ray.shutdown()
    assert got == expected
