"""Bounded compile time: a grammar that compiles for longer than the manager's timeout fails its own request
(an "abort" finish naming the timeout offline, a 400 on the server) while other requests run on, and no KV block
is left behind. The slow compile is real (``slow_grammars``: ~18 s in xgrammar), in a worker process that the
manager kills at the deadline."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from tests.structured_output.slow_grammars import slow_json_schema

FAST_REGEX = "fast[0-9]{3}"
TIMEOUT_S = 1.5


def short_compile_timeout(manager, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the manager's workers (seconds, once), then give compiles a deadline of ``TIMEOUT_S``."""
    manager.prepare(StructuredOutputsParams(json_object=True)).result(timeout=120)
    monkeypatch.setattr(manager, "compile_timeout_s", TIMEOUT_S)


def _no_blocks_in_use(engine_core) -> bool:
    scheduler = engine_core.scheduler
    return (not scheduler.has_unfinished_requests()
            and scheduler.kv_cache_manager.num_free_blocks == engine_core.num_blocks)


@pytest.mark.slow
def test_offline_compile_timeout_fails_only_its_request(llm: LLM, monkeypatch: pytest.MonkeyPatch):
    engine = llm.llm_engine
    short_compile_timeout(engine.input_processor.structured_output_manager, monkeypatch)
    slow = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(json=slow_json_schema("offline")))
    fast = SamplingParams(max_tokens=8, temperature=1.0, seed=3,
                          structured_outputs=StructuredOutputsParams(regex=FAST_REGEX))
    free = SamplingParams(max_tokens=6, ignore_eos=True)
    outputs = llm.generate(["a", "b", "c"], [slow, fast, free], use_tqdm=False)
    (timed_out,), (constrained,), (unconstrained,) = (output.outputs for output in outputs)
    assert timed_out.finish_reason == "abort" and timed_out.token_ids == []
    assert f"longer than {TIMEOUT_S:g} s to compile" in timed_out.stop_reason
    assert constrained.finish_reason == "stop" and constrained.text.startswith("fast")
    assert unconstrained.finish_reason == "length" and len(unconstrained.token_ids) == 6
    assert _no_blocks_in_use(engine.engine_core)


def test_offline_after_a_timeout_other_grammars_still_compile(llm: LLM, monkeypatch: pytest.MonkeyPatch):
    """The killed worker was replaced: the next grammars compile and run."""
    short_compile_timeout(llm.llm_engine.input_processor.structured_output_manager, monkeypatch)
    slow = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(json=slow_json_schema("again")))
    (first,) = llm.generate(["a"], slow, use_tqdm=False)
    assert first.outputs[0].finish_reason == "abort"
    params = SamplingParams(max_tokens=30, structured_outputs=StructuredOutputsParams(regex="after[a-z]{2}"))
    (second,) = llm.generate(["a"], params, use_tqdm=False)
    assert second.outputs[0].finish_reason == "stop" and second.outputs[0].text.startswith("after")
