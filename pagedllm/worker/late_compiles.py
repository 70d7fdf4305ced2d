"""Log every Triton kernel specialization first used after start-up.

The engine compiles its kernels during start-up (the profile run, the CUDA graph captures, the sampler warm-up). A
specialization first needed later (a new constexpr, an integer argument whose divisibility by 16 differs, a new
dtype) is compiled, or loaded from Triton's disk cache, inside the step that needs it, and that step and every
request in it wait: up to a second for a compile. The log names the kernel and its specialization, so the warm-up
can be made to cover it. Triton calls ``knobs.runtime.jit_cache_hook`` on each miss of a kernel's in-process cache.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class LateCompileLog:
    """The hook: logs each miss and counts them (``count``), then defers to the hook installed before it."""

    def __init__(self, previous: Any = None) -> None:
        self.previous = previous
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> bool | None:
        # Triton passes keywords (``repr``: the kernel and its specialization); take what there is, never raise
        # inside its JIT.
        self.count += 1
        logger.info("Triton kernel first used after start-up, compiled or loaded inside a step: %s",
                    describe(kwargs) or args)
        return self.previous(*args, **kwargs) if self.previous is not None else None


def describe(kwargs: dict[str, Any]) -> str:
    """The kernel and its specialization: each argument's type, ``/16`` where Triton assumed it divisible by 16
    (a pointer's alignment, an integer's value), and the constexprs' values. Triton's own ``repr`` names the kernel
    and its launch options; its argument list is garbled in some versions (3.6 prints ``(x_ptr: (``)."""
    text = str(kwargs.get("repr") or kwargs.get("key") or "")
    try:
        spec = kwargs["compile"]
        signature, constants, attrs = spec["signature"], spec["constants"], spec["configs"][0]
        divisible = {path[0] for path, values in attrs.items() if any(v[0] == "tt.divisibility" for v in values)}
        args = [f"{name}={constants.get((i,))}" if kind == "constexpr"
                else f"{name}: {kind}{'/16' if i in divisible else ''}"
                for i, (name, kind) in enumerate(signature.items())]
    except (KeyError, IndexError, TypeError, AttributeError):  # a Triton that passes less: its repr alone
        return text
    return f"{text.split('(')[0]}({', '.join(args)})"


def install() -> LateCompileLog | None:
    """Log from now on every kernel specialization this process compiles, once per process however many engines
    it starts (None where this Triton has no hook)."""
    try:
        import triton
    except ImportError:
        return None
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_cache_hook"):
        return None
    if isinstance(runtime.jit_cache_hook, LateCompileLog):  # another engine of this process installed it
        return runtime.jit_cache_hook
    hook = LateCompileLog(runtime.jit_cache_hook)
    runtime.jit_cache_hook = hook
    return hook
