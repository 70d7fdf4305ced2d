"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper and newer GPUs).

A batch-1 decode step is a chain of small kernels (about ten per layer), each of which pays a fixed cost before
its first useful byte: the launch and placing its programs on the SMs. Launched with PDL, a kernel is placed on
the SMs while the kernel before it is still running, so that cost can overlap the other's tail.

The rule for every kernel launched with ``launch_options``: its first step is ``wait_for_earlier_kernels``, before
it reads or writes any memory. After that call every write of the kernel before it (and, since that one waited
too, of all earlier kernels) is visible, and every read of theirs is done. A kernel launched without PDL (torch's,
cuBLAS's) keeps the plain stream order, and a PDL kernel after it simply starts when it ends. Inside a CUDA graph
the dependencies are captured as programmatic edges (CUDA 12.3 and newer).

Where a kernel lets the next one be placed (``TRIGGER``): ``"start"``, right after its wait, so the next kernel's
programs may take SM slots while this one still has programs to place; or ``"late"``, where the kernel calls
``allow_later_kernels``: after the main loop in the GEMMs, the attention kernels and the MoE decode kernels, at exit
in the kernels without the call. Where the trigger sits changes only the overlap, never the result: each kernel still waits first.

On by default, trigger at the start (``PAGEDLLM_PDL``: ``start``, ``late`` or ``0``): on an H200 it took the
batch-1 decode step of Qwen3-0.6B from 1.13 to 0.93 ms, Llama-3.1-8B from 4.35 to 4.17 ms and Qwen3-30B-A3B from
3.19 to 3.01 ms (same call, two interleaved repeats; the late trigger gave 0.99, 4.29 and 2.99 ms;
benchmarks/h200/session32). Earlier it changed nothing measurable, but only with the slower fused GEMM prologues on
(benchmarks/h200/issue14-decode-fusions), and a bulk L2 prefetch of each GEMM's first weight columns before the wait
made it 9% slower. Correct under CUDA-graph capture (tests/model/test_skinny_gemm.py). Always off on CPU and in
Triton's interpreter (``USE_PDL`` 0 removes the calls at compile time).

Imported only by the kernel modules, themselves imported on first CUDA use.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from pagedllm.config import pdl_mode_from_env

_MODE = pdl_mode_from_env()
ENABLED = _MODE != "0"  # launches every kernel here with PDL on Hopper and newer (measured faster: see above)
TRIGGER = "late" if _MODE == "late" else "start"
# The kernels' ``USE_PDL`` constexpr: off, or on with the trigger at the start or late.
_OFF, _TRIGGER_AT_START, _TRIGGER_LATE = 0, 1, 2


def launch_options(device: torch.device) -> dict[str, Any]:
    """Keywords for a kernel launch on ``device``: the kernel's ``USE_PDL`` constexpr, and Triton's ``launch_pdl``
    when PDL is on (``ENABLED``, a CUDA device of compute capability 9.0 or newer: the ``griddepcontrol``
    instructions)."""
    if ENABLED and device.type == "cuda" and _has_grid_dependency_control(device.index or 0):
        if TRIGGER not in ("start", "late"):
            raise ValueError(f"pdl.TRIGGER must be 'start' or 'late', not {TRIGGER!r}")
        return {"USE_PDL": _TRIGGER_AT_START if TRIGGER == "start" else _TRIGGER_LATE, "launch_pdl": True}
    return {"USE_PDL": _OFF}


@functools.cache
def _has_grid_dependency_control(device_index: int) -> bool:
    """An NVIDIA GPU of compute capability 9.0 or newer (ROCm reports its own capabilities: never there)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


@triton.jit
def wait_for_earlier_kernels(USE_PDL: tl.constexpr):
    """Block until the kernel launched before this one has finished and its writes are visible; with the trigger
    at the start, then let the next kernel be placed on the SMs (it runs its own prologue while this one works).
    Nothing without PDL."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if USE_PDL == 1:  # _TRIGGER_AT_START
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def allow_later_kernels(USE_PDL: tl.constexpr):
    """With the late trigger: let the next kernel be placed now (what is left of this program is its epilogue).
    Nothing otherwise."""
    if USE_PDL == 2:  # _TRIGGER_LATE
        tl.extra.cuda.gdc_launch_dependents()
