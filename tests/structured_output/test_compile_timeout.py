"""Bounded compile time: a grammar that compiles for longer than the manager's timeout fails its own request
(an "abort" finish naming the timeout offline, a 400 on the server) while other requests run on, and no KV block
is left behind. The slow compile is made deterministic: the backend's compile blocks on an event for one spec
(what a pathological regex does to a compile thread), and the timeout is a fraction of a second."""

from __future__ import annotations

import threading

import pytest

from pagedllm import LLM, SamplingParams, StructuredOutputsParams

FAST_REGEX = "fast[0-9]{3}"
TIMEOUT_S = 0.3


class HangingCompiles:
    """Wraps a manager's backend so that compiling a grammar with the word "slow" in it blocks until
    ``release()`` (each test uses its own such regex: compiled grammars are cached by spec)."""

    def __init__(self, manager, monkeypatch: pytest.MonkeyPatch) -> None:
        self.released = threading.Event()
        backend = manager.backend
        original_parse, original_compile = backend.parse, backend.compile
        slow_grammars: list = []

        def parse(kind, spec):
            grammar = original_parse(kind, spec)
            if "slow" in str(spec):
                slow_grammars.append(grammar)
            return grammar

        def compile_(grammar):
            if any(grammar is slow for slow in slow_grammars):
                self.released.wait(timeout=30)
            return original_compile(grammar)

        monkeypatch.setattr(backend, "parse", parse)
        monkeypatch.setattr(backend, "compile", compile_)
        monkeypatch.setattr(manager, "compile_timeout_s", TIMEOUT_S)

    def release(self) -> None:
        self.released.set()


def _no_blocks_in_use(engine_core) -> bool:
    scheduler = engine_core.scheduler
    return (not scheduler.has_unfinished_requests()
            and scheduler.kv_cache_manager.num_free_blocks == engine_core.num_blocks)


def test_offline_compile_timeout_fails_only_its_request(llm: LLM, monkeypatch: pytest.MonkeyPatch):
    engine = llm.llm_engine
    hang = HangingCompiles(engine.input_processor.structured_output_manager, monkeypatch)
    try:
        slow = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="slow[0-9]{3}"))
        fast = SamplingParams(max_tokens=8, temperature=1.0, seed=3,
                              structured_outputs=StructuredOutputsParams(regex=FAST_REGEX))
        free = SamplingParams(max_tokens=6, ignore_eos=True)
        outputs = llm.generate(["a", "b", "c"], [slow, fast, free], use_tqdm=False)
    finally:
        hang.release()
    (timed_out,), (constrained,), (unconstrained,) = (output.outputs for output in outputs)
    assert timed_out.finish_reason == "abort" and timed_out.token_ids == []
    assert "timed out" in timed_out.stop_reason
    assert constrained.finish_reason == "stop" and constrained.text.startswith("fast")
    assert unconstrained.finish_reason == "length" and len(unconstrained.token_ids) == 6
    assert _no_blocks_in_use(engine.engine_core)


def test_offline_timeout_then_the_same_spec_runs_once_compiled(llm: LLM, monkeypatch: pytest.MonkeyPatch):
    """The timed-out compile keeps its thread until it ends (a C++ compile cannot be interrupted); once it has
    ended, the same spec is served from the cache."""
    manager = llm.llm_engine.input_processor.structured_output_manager
    hang = HangingCompiles(manager, monkeypatch)
    params = SamplingParams(max_tokens=30, structured_outputs=StructuredOutputsParams(regex="slower[a-z]{2}"))
    try:
        (first,) = llm.generate(["a"], params, use_tqdm=False)
    finally:
        hang.release()
    assert first.outputs[0].finish_reason == "abort"
    manager.prepare(params.structured_outputs).result(timeout=30)
    (second,) = llm.generate(["a"], params, use_tqdm=False)
    assert second.outputs[0].finish_reason == "stop" and second.outputs[0].text.startswith("slow")
