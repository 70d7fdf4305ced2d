"""The model runner's CUDA-graph paths (decode, and small mixed steps), exercised on CPU.

A graph replays the forward on the step buffers' padded rows. Here a stand-in "graph" runs that very
forward eagerly (Triton kernels in the interpreter), so the padding rules (slot -1, context 0) and the staging
are checked against the plain torch engine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is decorated
pytest.importorskip("triton")

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.worker import model_runner  # noqa: E402
from pagedllm.worker.cuda_graphs import capture_sizes, decode_context_bounds, mixed_capture_sizes  # noqa: E402
from pagedllm.worker.model_runner import ModelRunner  # noqa: E402
from tests.utils import build_tiny_model  # noqa: E402


class EagerGraphs:
    """Stands in for DecodeGraphs: "capturing" keeps the forward, "replaying" runs it on the buffers' rows."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.replayed: list[int] = []

    def capture(self, sizes, forward, device, pool=None) -> float:
        self.sizes, self.forward = sorted(sizes), forward
        return 0.0

    def padded_size(self, num_reqs: int) -> int | None:
        return next((size for size in self.sizes if size >= num_reqs), None)

    replaying = False  # inside a replay (what the forward runs there is "in the graph")

    def replay(self, padded_size: int) -> torch.Tensor:
        self.replayed.append(padded_size)
        self.replaying = True
        try:
            return self.forward(padded_size)
        finally:
            self.replaying = False


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert mixed_capture_sizes(8) == []
    assert mixed_capture_sizes(40) == [16, 32]
    assert mixed_capture_sizes(8192) == [16, 32, 64, 128, 256]


def test_a_decode_step_replays_the_graph_of_the_smallest_context_bound_that_holds_it() -> None:
    assert decode_context_bounds(40960) == [256, 1024]
    assert decode_context_bounds(1024) == [256]
    assert decode_context_bounds(128) == []
    runner = object.__new__(ModelRunner)  # only the graph tables are needed
    runner.decode_graphs = EagerGraphs()
    runner.decode_graphs.sizes = [1, 2, 4, 8, 16, 24]
    short, medium = EagerGraphs(), EagerGraphs()
    short.sizes, medium.sizes = [1, 2, 4, 8, 16], [1, 2, 4]
    runner.bounded_decode_graphs = {256: short, 1024: medium}
    assert runner._decode_graphs_for(1, 100) is short
    assert runner._decode_graphs_for(1, 256) is short
    assert runner._decode_graphs_for(4, 257) is medium
    assert runner._decode_graphs_for(8, 257) is runner.decode_graphs  # no 8-row graph under the 1024 bound
    assert runner._decode_graphs_for(24, 10) is runner.decode_graphs  # no 24-row graph under any bound
    assert runner._decode_graphs_for(1, 1025) is runner.decode_graphs


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: on a GPU the real graphs are tested (test_gpu.py)")
@pytest.mark.parametrize(("logits_in_graph", "logits_max_rows"), [(False, 16), (True, 16), (True, 2)])
def test_padded_decode_path_matches_the_torch_engine(tmp_path, monkeypatch, logits_in_graph: bool,
                                                     logits_max_rows: int) -> None:
    """Also with the LM head inside the decode graphs (``LOGITS_IN_DECODE_GRAPHS``), for all of them or only those
    of at most 2 rows (``LOGITS_GRAPH_MAX_ROWS``): the decode steps then sample from the logits the replay gives."""
    monkeypatch.setattr(model_runner, "LOGITS_GRAPH_MAX_ROWS", logits_max_rows)
    model_dir = build_tiny_model(tmp_path, "qwen3")
    prompts = [{"prompt_token_ids": [5 + i, 9, 13, 17, 21][: 2 + i % 4] * (1 + i % 2)} for i in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True, logprobs=0) for i in range(5)]
    # A budget of 40 tokens: the first steps (prefills of several prompts) fit the 16- or 32-token mixed graphs.
    common = {"device": "cpu", "block_size": 4, "max_model_len": 64, "max_num_seqs": 8, "skip_tokenizer_init": True,
              "max_num_batched_tokens": 40}
    expected = LLM(model_dir, **common).generate(prompts, params, use_tqdm=False)

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    llm = LLM(model_dir, **common)
    runner = llm.llm_engine.engine_core.model_runner
    runner.logits_in_decode_graphs = logits_in_graph
    graphs = runner.decode_graphs = EagerGraphs()
    heads_in_graph = []
    compute_logits = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits", lambda hidden: heads_in_graph.append(graphs.replaying) or
                        compute_logits(hidden))
    sampling_steps = []
    sample = runner._sample
    monkeypatch.setattr(runner, "_sample", lambda hidden, inputs: sampling_steps.append(bool(inputs.sample_req_ids))
                        or sample(hidden, inputs))
    mixed = runner.mixed_graphs = EagerGraphs()
    runner._capture_cuda_graphs()
    assert mixed.sizes == [16, 32]
    outputs = llm.generate(prompts, params, use_tqdm=False)

    assert set(graphs.replayed) >= {8, 4, 2}  # batches of 5, 3-4 and 2 decodes ran padded
    assert mixed.replayed  # the prefills ran as padded mixed steps
    # One head a sampling step; a decode step's inside its graph, and only there, with the flag.
    assert len(heads_in_graph) == sampling_steps.count(True)
    in_graph = [size for size in graphs.replayed if size <= logits_max_rows] if logits_in_graph else []
    assert heads_in_graph.count(True) == len(in_graph)
    for ours, reference in zip(outputs, expected):
        assert ours.outputs[0].token_ids == reference.outputs[0].token_ids
        for got, want in zip(ours.outputs[0].logprobs, reference.outputs[0].logprobs):
            token = next(iter(want))
            assert abs(got[token].logprob - want[token].logprob) < 1e-4
