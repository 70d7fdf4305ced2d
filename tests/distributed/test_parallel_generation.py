"""Greedy generations with tensor and pipeline parallelism (multiprocess executor, gloo on CPU) equal tp=1 token for
token in float32, for the Llama family, Gemma 2 / 3 and Phi-3 / Phi-4-mini. The tiny models have 4 query heads and 2
KV heads: tp=4 replicates each KV head on two ranks."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import greedy_tokens

_reference: dict[str, list[list[int]]] = {}


def _reference_tokens(model_dir: str) -> list[list[int]]:
    if model_dir not in _reference:
        _reference[model_dir] = greedy_tokens(model_dir)
    return _reference[model_dir]


@pytest.mark.parametrize(("arch", "tp", "pp"), [
    ("llama", 2, 1),
    ("qwen3", 1, 2),
    pytest.param("llama", 4, 1, marks=pytest.mark.slow),  # tp > num_kv_heads: KV heads replicated
    pytest.param("llama", 1, 2, marks=pytest.mark.slow),
    pytest.param("llama", 2, 2, marks=pytest.mark.slow),
    pytest.param("qwen3", 2, 1, marks=pytest.mark.slow),  # q/k norm, head_dim != hidden / heads
    pytest.param("qwen3", 4, 1, marks=pytest.mark.slow),
    pytest.param("qwen3_tied", 2, 2, marks=pytest.mark.slow),  # tied LM head: the last stage holds the table too
    pytest.param("qwen2", 2, 1, marks=pytest.mark.slow),  # q/k/v bias: sliced with the heads
    pytest.param("mistral", 2, 1, marks=pytest.mark.slow),
    pytest.param("llama3_rope", 2, 2, marks=pytest.mark.slow),
    # Gemma: windowed and global layers, soft caps, (1 + w) norms within each rank's heads, tied vocab-parallel head
    pytest.param("gemma2", 2, 1, marks=pytest.mark.slow),
    pytest.param("gemma2", 4, 1, marks=pytest.mark.slow),
    pytest.param("gemma2", 1, 2, marks=pytest.mark.slow),
    pytest.param("gemma3", 2, 1, marks=pytest.mark.slow),  # per-head q/k norms, two rotary tables
    pytest.param("gemma3", 2, 2, marks=pytest.mark.slow),  # 3 layers: stages of 2 and 1
    # Phi-3: the checkpoint's fused qkv / gate_up cut per rank by the loader; LongRoPE
    pytest.param("phi3_longrope", 2, 1, marks=pytest.mark.slow),
    pytest.param("phi3_longrope", 1, 2, marks=pytest.mark.slow),
    pytest.param("phi4_mini", 2, 1, marks=pytest.mark.slow),  # partial rotary: each rank's heads permuted
    pytest.param("phi4_mini", 4, 1, marks=pytest.mark.slow),
    pytest.param("phi4_mini", 2, 2, marks=pytest.mark.slow),  # tied LM head on the last stage
])
def test_parallel_greedy_equals_single_device(tiny_model_dir, arch, tp, pp):
    model_dir = tiny_model_dir(arch)
    expected = _reference_tokens(model_dir)
    got = greedy_tokens(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert got == expected


def test_unsupported_family_is_refused_clearly(tiny_model_dir):
    from pagedllm.worker.executor import WorkerDiedError

    with pytest.raises(WorkerDiedError, match="does not support tensor or pipeline parallelism"):
        greedy_tokens(tiny_model_dir("qwen3_moe"), tensor_parallel_size=2)


def test_startup_report_names_the_layout(tiny_model_dir):
    from pagedllm import LLM

    from tests.distributed.conftest import ENGINE_KWARGS

    llm = LLM(tiny_model_dir("llama"), **ENGINE_KWARGS, tensor_parallel_size=2)
    try:
        report = llm.llm_engine.engine_core.startup_report
        assert report["parallel_layout"] == "tp2 x pp1"
        assert report["distributed_executor_backend"] == "mp"
        assert report["num_gpu_blocks"] == 32
    finally:
        llm.llm_engine.engine_core.shutdown()
