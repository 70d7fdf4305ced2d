"""The late-compile log: a Triton kernel specialization first used after start-up is logged by name, once per
miss, and the hook installed before it still runs."""

from __future__ import annotations

import logging

import pytest

from pagedllm.worker import late_compiles

triton = pytest.importorskip("triton")
runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
pytestmark = pytest.mark.skipif(runtime is None or not hasattr(runtime, "jit_cache_hook"),
                                reason="this Triton has no jit_cache_hook")


def test_each_miss_is_logged_and_the_previous_hook_still_runs(monkeypatch, caplog) -> None:
    seen = []

    def previous(**kwargs):
        seen.append(kwargs["repr"])
        return None

    monkeypatch.setattr(runtime, "jit_cache_hook", previous)
    hook = late_compiles.install()
    assert runtime.jit_cache_hook is hook
    with caplog.at_level(logging.INFO, logger=late_compiles.__name__):
        for name in ("_rms_norm_kernel[num_warps=4](x_ptr: *bf16, n: i32)", "_decode_kernel[num_warps=4]()"):
            assert hook(key=(), repr=name, fn=None, compile={}, is_manual_warmup=False, already_compiled=False) is None
    assert hook.count == 2 and seen == ["_rms_norm_kernel[num_warps=4](x_ptr: *bf16, n: i32)",
                                        "_decode_kernel[num_warps=4]()"]
    assert "_rms_norm_kernel[num_warps=4](x_ptr: *bf16, n: i32)" in caplog.text and "_decode_kernel" in caplog.text


def test_a_second_engine_in_the_process_does_not_log_twice(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "jit_cache_hook", None)
    first = late_compiles.install()
    assert late_compiles.install() is first and first.previous is None


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_a_kernel_compiled_after_install_is_logged(monkeypatch, caplog) -> None:
    import torch
    import triton.language as tl

    @triton.jit
    def _fill_kernel(out_ptr, value, BLOCK: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, BLOCK), value)

    monkeypatch.setattr(runtime, "jit_cache_hook", None)
    hook = late_compiles.install()
    out = torch.empty(16, device="cuda")
    with caplog.at_level(logging.INFO, logger=late_compiles.__name__):
        _fill_kernel[(1,)](out, 3.0, BLOCK=16)
        _fill_kernel[(1,)](out, 4.0, BLOCK=16)  # the same specialization: cached, no second miss
    assert hook.count == 1 and "_fill_kernel" in caplog.text and torch.all(out == 4.0)


def test_the_log_names_each_argument_its_alignment_and_the_constexprs(monkeypatch, caplog) -> None:
    spec = {"signature": {"x_ptr": "*bf16", "seeds_ptr": "*i64", "n": "i32", "HAS_GREEDY": "constexpr"},
            "constants": {(3,): False}, "configs": [{(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}]}
    monkeypatch.setattr(runtime, "jit_cache_hook", None)
    hook = late_compiles.install()
    with caplog.at_level(logging.INFO, logger=late_compiles.__name__):
        hook(key=(), repr="_sample_kernel[num_warps=8](x_ptr: (", fn=None, compile=spec, is_manual_warmup=False,
             already_compiled=False)
    assert "_sample_kernel[num_warps=8](x_ptr: *bf16/16, seeds_ptr: *i64, n: i32/16, HAS_GREEDY=False)" in caplog.text
