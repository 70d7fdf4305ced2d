"""The CPU thread policy (``platform.engine_cpu_threads``): what the user set wins; else the cores other processes
leave free, less one for the API server when serving; and ``LLM`` applies it."""

from __future__ import annotations

import pytest
import torch

from pagedllm import platform
from pagedllm.config import cpu_threads_from_env


@pytest.fixture
def eight_cores(monkeypatch):
    """A machine of 8 cores whose load average the test sets."""
    monkeypatch.setattr(platform.os, "sched_getaffinity", lambda pid: set(range(8)))
    load = [0.0]
    monkeypatch.setattr(platform.os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    return load


def test_free_cores_less_one_for_the_server(eight_cores):
    eight_cores[0] = 2.4  # two cores busy elsewhere
    assert platform.engine_cpu_threads(None, beside_api_server=False) == 6
    assert platform.engine_cpu_threads(None, beside_api_server=True) == 5
    eight_cores[0] = 20.0  # a machine busier than it has cores: still one thread
    assert platform.engine_cpu_threads(None, beside_api_server=True) == 1


def test_what_the_user_set_wins(eight_cores):
    eight_cores[0] = 20.0
    assert platform.engine_cpu_threads(6, beside_api_server=True) == 6


def test_environment(monkeypatch):
    monkeypatch.delenv("PAGEDLLM_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads_from_env() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads_from_env() == 2
    monkeypatch.setenv("PAGEDLLM_CPU_THREADS", "3")  # pagedllm's own variable first
    assert cpu_threads_from_env() == 3
    monkeypatch.setenv("PAGEDLLM_CPU_THREADS", "many")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_THREADS"):
        cpu_threads_from_env()


def test_llm_sets_torch_threads(tiny_model):
    from pagedllm import LLM

    before = torch.get_num_threads()
    try:
        LLM(tiny_model("llama"), cpu_threads=1, max_model_len=64, kv_cache_memory_bytes=1 << 20)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="cpu_threads must be at least 1"):
            LLM(tiny_model("llama"), cpu_threads=0)
    finally:
        torch.set_num_threads(before)
