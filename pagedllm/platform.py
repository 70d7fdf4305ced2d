"""Device detection: which device runs the model, its default dtype, whether Triton kernels can be used, how
many CPU threads a model on the CPU gets, and how a serving process's garbage collector is scheduled.

Kept free of a top-level torch import so that the pure-Python scheduler side can read it without loading torch.
"""

from __future__ import annotations

import functools
import gc
import logging
import os

logger = logging.getLogger(__name__)


@functools.cache
def cuda_is_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def triton_is_usable() -> bool:
    """Whether Triton kernels can run here: a CUDA device and an importable Triton."""
    if not cuda_is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def triton_ops_enabled() -> bool:
    """Whether the model's fused elementwise kernels (``model/triton_ops.py``) replace the torch ops on CUDA:
    Triton is usable and ``PAGEDLLM_DISABLE_TRITON_OPS=1`` is not set. Decided once per process."""
    from pagedllm.config import triton_ops_disabled_by_env  # lazy: config imports this module

    return triton_is_usable() and not triton_ops_disabled_by_env()


def resolve_device(device: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is present, else ``"cpu"``; validate explicit choices."""
    if device == "auto":
        return "cuda" if cuda_is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not cuda_is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, config_dtype: str | None, device: str) -> str:
    """Pick the model dtype name: ``"auto"`` is the checkpoint's dtype on GPU and float32 on CPU."""
    aliases = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}
    dtype = aliases.get(dtype, dtype)
    if dtype == "auto":
        if device == "cpu":
            return "float32"
        config_dtype = aliases.get(config_dtype or "", config_dtype)
        # A float32 checkpoint is served in bfloat16 on GPU, as vLLM does: same range, half the memory.
        return config_dtype if config_dtype in ("float16", "bfloat16") else "bfloat16"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be one of auto, float32, float16, bfloat16, got {dtype!r}")
    return dtype


def triton_supports(head_dim: int, block_size: int) -> bool:
    """Whether the Triton attention kernels handle these shapes: head_dim up to 256 (padded to a power of two in
    the tiles) and a power-of-two block size."""
    return 0 < head_dim <= 256 and block_size > 0 and block_size & (block_size - 1) == 0


def resolve_attention_backend(name: str, device: str, head_dim: int, block_size: int) -> str:
    """``"auto"``: Triton on CUDA when the shapes allow it (and Triton imports), else the torch reference."""
    if name != "auto":
        if name == "triton" and not triton_supports(head_dim, block_size):
            raise ValueError(
                "The triton attention backend needs head_dim <= 256 and a power-of-two block_size; "
                f"got head_dim={head_dim}, block_size={block_size}"
            )
        return name
    usable = device == "cuda" and triton_is_usable() and triton_supports(head_dim, block_size)
    return "triton" if usable else "torch"


def engine_cpu_threads(requested: int | None, beside_api_server: bool) -> int:
    """Intra-op threads for a model on the CPU: ``requested`` when given (``--cpu-threads``, ``LLM(cpu_threads=)``,
    ``PAGEDLLM_CPU_THREADS`` or ``OMP_NUM_THREADS``); else the cores this process may use, less those other processes
    keep busy (the 1-minute load average) and, beside an API server, one for it (its event loop, tokenizing,
    detokenizing). torch's own default, one thread per core, fights for the cores: every op waits at a barrier for
    its slowest thread, and a thread that lost its core stalls them all. Measured on 2 busy cores (load 3-6): offline
    stories260K 20 -> 216 output tokens/s and SmolLM2-135M 0.96 -> 8.5 with 1 thread instead of 2; serving a
    300-token stream took 38 s with 2 threads and 6 s with 1 (benchmarks/cpu/)."""
    if requested is not None:
        return requested
    num_free = _num_usable_cores() - _num_busy_cores() - (1 if beside_api_server else 0)
    return max(1, num_free)


def set_engine_cpu_threads(requested: int | None, beside_api_server: bool) -> int:
    """Give torch ``engine_cpu_threads``'s count for this process (a process-wide setting) and log it."""
    import torch

    num_threads = engine_cpu_threads(requested, beside_api_server)
    torch.set_num_threads(num_threads)
    how = "as set" if requested is not None else f"of {_num_usable_cores()} cores, load {_load_average():.1f}"
    logger.info("CPU: %d intra-op thread(s) (%s; --cpu-threads or PAGEDLLM_CPU_THREADS to "
                                     "set)", num_threads, how)
    return num_threads


# Allocations between two young-generation collections in a serving process (CPython's default: 700).
_SERVING_GC_THRESHOLD = 50_000


def tune_gc_for_serving() -> None:
    """Once a serving process has started: take everything built so far (modules, the model, the tokenizer: ~250k
    objects) out of the cyclic garbage collector's sight, and collect the young generation less often.

    A full collection walks every tracked object: ~140 ms over the start-up heap on a 2-core box, holding the GIL
    (a stalled event loop, or a core that launches nothing); a serving process met several a minute. And every
    700 allocations (a step of 256 outputs makes ~1000) a young collection scanned objects that live only until
    the event loop takes them, and promoted them: a quarter to a third of the API server's CPU went to the
    collector in a `bench serve` replay (benchmarks/cpu/serve-frontend). Cycles made later are still collected,
    just later."""
    gc.collect()  # what is garbage now is not kept forever
    gc.freeze()
    gc.set_threshold(_SERVING_GC_THRESHOLD, *gc.get_threshold()[1:])


def _num_usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _num_busy_cores() -> int:
    """Cores other processes keep busy: the 1-minute load average, rounded. Read as the engine starts, so this
    process's own start-up (imports, loading weights: a few seconds) weighs little in it."""
    return int(_load_average() + 0.5)


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return 0.0
