"""Frozen configuration, built once from the user's arguments and a model's ``config.json``.

This is the only module that reads environment variables. It imports no torch: dtypes are carried as names
(``"float32"``, ``"bfloat16"``, ...) and turned into torch dtypes on the worker side.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedllm.model.gguf import find_gguf_file, gguf_to_hf_config  # torch-free at import, like this module
from pagedllm.model.registry import (  # torch-free, like gguf
    BASE_MODEL_ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    UNSUPPORTED_HINTS,
)
from pagedllm.platform import resolve_attention_backend, resolve_device, resolve_dtype
from pagedllm.pooling.config import PoolerConfig, load_pooler_config  # torch-free

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")  # longrope: Phi-3 (model/phi3.py)
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# What an engine runs for its model (vLLM's ``runner``): text generation, or pooling (embeddings). ``task`` is the
# older name of the same choice: "generate" or "embed".
RUNNERS = ("generate", "pooling")
_TASK_RUNNERS = {"generate": "generate", "embed": "pooling"}
# Weight quantization schemes (``--quantization``; also read from a checkpoint's ``quantization_config``).
QUANTIZATION_METHODS = ("fp8", "gptq", "awq", "compressed-tensors")
# KV cache element types (``kv_cache_dtype``, as vLLM's): "auto" = the model's dtype; "fp8" = "fp8_e4m3";
# "bfloat16" rounds a float32 model's K/V to bf16 (the reference FP8 accuracy is measured against).
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
_NAMED_KV_CACHE_DTYPES = {"bfloat16": "bfloat16", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                          "fp8_e5m2": "float8_e5m2"}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
_DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a Hugging Face ``config.json`` that shape the model, normalized across transformers versions."""

    model: str  # local directory holding config.json (+ weights unless load_format="dummy"), or a .gguf file
    tokenizer: str | None  # local directory, .gguf file or hub id of the tokenizer; None = no tokenizer
    architecture: str
    dtype: str  # resolved torch dtype name
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # {"rope_type": "linear"|"llama3", ...} or None for plain RoPE
    max_position_embeddings: int
    max_model_len: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    quantization: str | None = None  # one of QUANTIZATION_METHODS, None for a dense model
    quantization_config: dict[str, Any] | None = None  # the checkpoint's; None when quantizing online
    # The whole config.json (or a GGUF model's equivalent): what only one family needs (biases, norms, experts,
    # windows) is read from it by that family's module, not given a field here.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        tokenizer: str | None,
        dtype: str = "auto",
        device: str = "cpu",
        max_model_len: int | None = None,
        quantization: str | None = None,
    ) -> ModelConfig:
        """Read ``config.json`` of an HF model directory, or the metadata of a GGUF model (a ``.gguf`` file, or a
        directory holding one); for GGUF, ``model`` is then the ``.gguf`` file itself."""
        gguf_file = find_gguf_file(model_dir)
        if gguf_file is not None:
            if quantization is not None:
                raise ValueError(f"quantization={quantization!r} does not apply to a GGUF model: its weights are "
                                 "dequantized at load")
            hf = gguf_to_hf_config(gguf_file)
            return cls.from_dict(hf, str(gguf_file), tokenizer, dtype, device, max_model_len)
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"No config.json in {model_dir!r}: not a Hugging Face model directory")
        return cls.from_dict(json.loads(path.read_text()), model_dir, tokenizer, dtype, device, max_model_len,
                             quantization)

    @classmethod
    def from_dict(
        cls,
        hf: dict[str, Any],
        model_dir: str,
        tokenizer: str | None,
        dtype: str = "auto",
        device: str = "cpu",
        max_model_len: int | None = None,
        quantization: str | None = None,
    ) -> ModelConfig:
        architecture = _architecture(hf)
        hidden_size = hf["hidden_size"]
        num_heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _rope(hf)
        max_positions = hf.get("max_position_embeddings", 2048)
        return cls(
            model=model_dir,
            tokenizer=tokenizer,
            architecture=architecture,
            dtype=resolve_dtype(dtype, hf.get("dtype") or hf.get("torch_dtype"), device),
            vocab_size=hf["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            max_model_len=_max_model_len(hf, architecture, max_positions, max_model_len),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids(hf.get("eos_token_id")),
            quantization=_quantization_method(hf.get("quantization_config"), quantization),
            quantization_config=hf.get("quantization_config"),
            hf_config=hf,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies in a cache of the model's dtype, over all layers."""
        return self.kv_bytes_per_token_in("auto")

    def kv_bytes_per_token_in(self, cache_dtype: str) -> int:
        """Bytes of K and V that one token occupies in a cache of ``cache_dtype`` (one of KV_CACHE_DTYPES)."""
        itemsize = _DTYPE_BYTES[kv_cache_dtype_name(cache_dtype, self.dtype)]
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize


def kv_cache_dtype_name(cache_dtype: str, model_dtype: str) -> str:
    """The torch dtype name of the KV cache's elements: the model's for "auto", else the format named."""
    if cache_dtype == "auto":
        return model_dtype
    if cache_dtype not in _NAMED_KV_CACHE_DTYPES:
        raise ValueError(f"Unsupported kv_cache_dtype {cache_dtype!r}; pagedllm supports: {', '.join(KV_CACHE_DTYPES)}")
    return _NAMED_KV_CACHE_DTYPES[cache_dtype]


def _quantization_method(checkpoint: dict[str, Any] | None, requested: str | None) -> str | None:
    """The scheme to run: the checkpoint's (``quantization_config.quant_method``), which a requested one must match;
    or the requested one on a dense checkpoint (FP8 quantizes online; the others fill dummy weights only)."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"Unsupported quantization {requested!r}; pagedllm supports: {', '.join(QUANTIZATION_METHODS)}")
    if checkpoint is None:
        return requested
    stored = str(checkpoint.get("quant_method", "")).lower().replace("_", "-")
    if stored not in QUANTIZATION_METHODS:
        raise ValueError(f"The checkpoint is quantized with {stored or 'an unnamed method'!r}, which pagedllm does "
                         f"not support (supported: {', '.join(QUANTIZATION_METHODS)})")
    if requested is not None and requested != stored:
        raise ValueError(f"quantization={requested!r} does not match the checkpoint, which is quantized with "
                         f"{stored!r}; leave quantization unset to use the checkpoint's")
    return stored


def _architecture(hf: dict[str, Any]) -> str:
    architectures = hf.get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
        if name in BASE_MODEL_ARCHITECTURES:
            return BASE_MODEL_ARCHITECTURES[name]
    hints = [UNSUPPORTED_HINTS[name] for name in architectures if name in UNSUPPORTED_HINTS]
    raise ValueError(
        f"Unsupported model architecture {architectures or hf.get('model_type')!r}; "
        + "".join(f"{hint}; " for hint in hints) +
        f"pagedllm supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Read rotary settings from either transformers 4 (``rope_theta`` + ``rope_scaling``) or 5 (``rope_parameters``)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's older name
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"Unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **merged}


def _max_model_len(hf: dict[str, Any], architecture: str, max_positions: int, requested: int | None) -> int:
    # Sliding windows are attended as such by every backend: a windowed model runs to its full context.
    limit = max_positions
    if requested is None:
        return limit
    if requested < 1:
        raise ValueError(f"max_model_len must be at least 1, got {requested}")
    if requested > limit:
        raise ValueError(
            f"max_model_len={requested} exceeds the model's limit of {limit} tokens "
            "(max_position_embeddings)"
        )
    return requested


def _eos_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


@dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is sized and shaped."""

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    swap_space_bytes: int = 0  # CPU pool for swapped-out KV blocks (pinned on CUDA); 0 = recompute only
    cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES: "auto" = the model's dtype, "fp8*" = 1 byte per element
    # FP8 cache: set each layer's K and V scales from the first step's keys and values (max |x| / FP8 max), instead
    # of the checkpoint's (or 1.0 without them).
    calculate_kv_scales: bool = False

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"Unsupported kv_cache_dtype {self.cache_dtype!r}; pagedllm supports: "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of 2, got {self.block_size}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be at least 1, got {self.num_gpu_blocks_override}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space must be non-negative, got {self.swap_space_bytes / 2**30} GiB")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority" (lower priority value first)
    preemption_mode: str = "auto"  # "auto" | "recompute" | "swap": see core/scheduler.py
    # Plan step N+1 while the device runs step N (the same tokens as planning after it; see core/scheduler.py).
    async_scheduling: bool = False
    # With LoRA: the most distinct adapters one step may hold (the device's adapter slots); 0 = no LoRA.
    max_loras: int = 0

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'auto', 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"Without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_model_len ({self.max_model_len}) so that every prompt fits in one step"
            )


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """How grammars are compiled: the per-compile deadline, and the pending compiles one client may have."""

    compile_timeout_s: float = 30.0
    max_pending_per_client: int = 4

    def __post_init__(self) -> None:
        if not self.compile_timeout_s > 0:
            raise ValueError(f"structured_outputs_compile_timeout must be positive, got {self.compile_timeout_s}")
        if self.max_pending_per_client < 1:
            raise ValueError(f"max_pending_grammars_per_client must be >= 1, got {self.max_pending_per_client}")


# LoRA ranks the slot pool can be padded to (the kernels tile the rank by a power of 2).
LORA_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (``enable_lora``): adapters in one step (device slots), the largest rank they may have
    (every slot is padded to it), and adapters kept loaded on the CPU (LRU; ``None`` = ``max_loras``)."""

    max_loras: int = 8
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {LORA_RANKS}, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")

    @property
    def num_cpu_loras(self) -> int:
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


DISTRIBUTED_EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over devices: ``tensor_parallel_size`` ranks per stage, ``pipeline_parallel_size``
    stages, driven by ``distributed_executor_backend`` ("uni": in the engine's process, one device only; "mp": a
    process per rank on this host; "ray": Ray actors, across nodes)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "uni"
    # Data parallelism (``serve --data-parallel-size``): this engine core is replica ``data_parallel_rank`` of
    # ``data_parallel_size`` identical ones behind one API server; on CUDA it takes the devices
    # [rank * world_size, (rank + 1) * world_size) of those visible (``replica_cuda_visible_devices``).
    data_parallel_size: int = 1
    data_parallel_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank must be in [0, data_parallel_size = {self.data_parallel_size}), "
                             f"got {self.data_parallel_rank}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be at least 1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if self.distributed_executor_backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(DISTRIBUTED_EXECUTOR_BACKENDS)}"
                             f", got {self.distributed_executor_backend!r}")
        if self.world_size > 1 and self.distributed_executor_backend == "uni":
            raise ValueError("distributed_executor_backend 'uni' runs one device only; use 'mp' or 'ray' for "
                             f"tensor_parallel_size x pipeline_parallel_size = {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def layout(self) -> str:
        """The layout as the start-up report names it, e.g. ``dp2 x tp1 x pp1``."""
        return f"dp{self.data_parallel_size} x tp{self.tensor_parallel_size} x pp{self.pipeline_parallel_size}"

    @classmethod
    def resolve(cls, tp: int, pp: int, backend: str | None) -> ParallelConfig:
        """``backend`` None: in-process for one device, a process per rank ("mp") for more (one node)."""
        if backend is None:
            backend = "uni" if tp * pp == 1 else "mp"
        return cls(tp, pp, backend)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: str
    load_format: str
    seed: int
    skip_tokenizer_init: bool
    attention_backend: str
    enforce_eager: bool = False  # no CUDA graphs: every step runs eagerly
    structured_outputs_config: StructuredOutputsConfig = StructuredOutputsConfig()
    cpu_threads: int | None = None  # torch threads of a model on the CPU as the user set them; None = platform's pick
    lora_config: LoRAConfig | None = None  # None: LoRA off (requests with an adapter are refused)
    runner: str = "generate"  # one of RUNNERS: an engine generates, or pools (embeddings), never both
    pooler_config: PoolerConfig | None = None  # the model's pooling (set when runner == "pooling")
    parallel_config: ParallelConfig = ParallelConfig()  # tensor / pipeline parallel layout (one device by default)

    @property
    def is_pooling(self) -> bool:
        return self.runner == "pooling"

    def __post_init__(self) -> None:
        # Without a CPU pool every preemption recomputes: "swap" would be accepted and silently not honoured.
        if self.scheduler_config.preemption_mode == "swap" and self.cache_config.swap_space_bytes == 0:
            raise ValueError("preemption_mode 'swap' needs CPU swap space: set swap_space (--swap-space, in GiB) "
                             "above 0 (its default is 0 on CPU)")

    @property
    def kv_cache_dtype(self) -> str:
        """The torch dtype name of the KV cache's elements (the model's, or an FP8 one)."""
        return kv_cache_dtype_name(self.cache_config.cache_dtype, self.model_config.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies in the KV cache as configured, over all layers."""
        return self.model_config.kv_bytes_per_token_in(self.cache_config.cache_dtype)


@dataclass
class EngineArgs:
    """The user-facing arguments of ``LLM(...)`` (and later ``pagedllm serve``), before validation."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    swap_space: float | None = None  # GiB; default 4 on CUDA (as vLLM), 0 on CPU where swapping gains nothing
    preemption_mode: str = "auto"
    # Schedule the next step while the device runs this one (same outputs); None: on CUDA, where it pays (the host
    # work it hides is a third of a batch-1 decode step there), off on CPU (a CPU step leaves the host no time).
    async_scheduling: bool | None = None
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    load_format: str = "auto"
    quantization: str | None = None  # one of QUANTIZATION_METHODS; None: the checkpoint's, if any
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    calculate_kv_scales: bool = False  # FP8 KV cache: scales from the first step rather than the checkpoint's
    skip_tokenizer_init: bool = False
    revision: str | None = None
    enforce_eager: bool = False
    structured_outputs_compile_timeout: float = 30.0  # seconds one grammar may compile before its request fails
    max_pending_grammars_per_client: int = 4  # compiles one client may have waiting (the server answers 429 beyond)
    cpu_threads: int | None = None  # torch threads on CPU (default: $PAGEDLLM_CPU_THREADS, else platform's pick)
    enable_lora: bool = False  # serve LoRA adapters (LoRARequest / --lora-modules) over the base model
    max_loras: int = 8  # distinct adapters in one step (device slots)
    max_lora_rank: int = 16  # the largest adapter rank accepted (slots are padded to it)
    max_cpu_loras: int | None = None  # adapters kept loaded on the CPU; None = max_loras
    runner: str = "generate"  # one of RUNNERS; "pooling" serves embeddings (LLM.embed, /v1/embeddings)
    task: str | None = None  # "generate" or "embed": the same choice under vLLM's older name
    pooler_config: PoolerConfig | None = None  # pooling to use instead of what the model directory says
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # "uni" | "mp" | "ray"; None: "mp" when more than one rank

    def create_engine_config(self) -> EngineConfig:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        device = resolve_device(self.device)
        model_dir = resolve_model_dir(self.model, self.revision, weights=self.load_format != "dummy")
        tokenizer = None if self.skip_tokenizer_init else (self.tokenizer or model_dir)
        model_config = ModelConfig.from_pretrained(model_dir, tokenizer, self.dtype, device, self.max_model_len,
                                                   self.quantization)
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes or _default_kv_cache_bytes(device),
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=self.enable_prefix_caching,
                swap_space_bytes=int(self._swap_space_gib(device) * 2**30),
                cache_dtype=self.kv_cache_dtype,
                calculate_kv_scales=self.calculate_kv_scales,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self._max_num_batched_tokens(model_config.max_model_len, device),
                max_model_len=model_config.max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                policy=self.scheduling_policy,
                preemption_mode=self.preemption_mode,
                async_scheduling=device == "cuda" if self.async_scheduling is None else self.async_scheduling,
                max_loras=self.max_loras if self.enable_lora else 0,
            ),
            lora_config=LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras) if self.enable_lora else None,
            runner=self._runner(),
            pooler_config=load_pooler_config(model_dir, self.pooler_config) if self._runner() == "pooling" else None,
            parallel_config=ParallelConfig.resolve(self.tensor_parallel_size, self.pipeline_parallel_size,
                                                   self.distributed_executor_backend),
            device=device,
            load_format=self.load_format,
            seed=self.seed,
            skip_tokenizer_init=self.skip_tokenizer_init,
            enforce_eager=self.enforce_eager,
            cpu_threads=_requested_cpu_threads(self.cpu_threads),
            structured_outputs_config=StructuredOutputsConfig(self.structured_outputs_compile_timeout,
                                                              self.max_pending_grammars_per_client),
            attention_backend=resolve_attention_backend(
                os.environ.get("PAGEDLLM_ATTENTION_BACKEND", "auto"), device, model_config.head_dim, self.block_size
            ),
        )

    def _runner(self) -> str:
        """The runner from ``runner`` and ``task`` (which must agree when both are given)."""
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.task is None:
            return self.runner
        if self.task not in _TASK_RUNNERS:
            raise ValueError(f"task must be one of {', '.join(_TASK_RUNNERS)}, got {self.task!r}")
        runner = _TASK_RUNNERS[self.task]
        if self.runner != "generate" and self.runner != runner:
            raise ValueError(f"task={self.task!r} contradicts runner={self.runner!r}")
        return runner

    def _swap_space_gib(self, device: str) -> float:
        if self.swap_space is not None:
            return self.swap_space
        return 4.0 if device == "cuda" else 0.0

    def _max_num_batched_tokens(self, max_model_len: int, device: str) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if self.enable_chunked_prefill:
            # A GPU runs a step of 8192 tokens barely slower than one of 2048 (both are GEMM-bound), and fewer,
            # larger mixed steps finish prefills sooner; on CPU a step's time grows with its tokens.
            return max(8192 if device == "cuda" else 2048, self.max_num_seqs)
        return max(max_model_len, self.max_num_seqs)


def _default_kv_cache_bytes(device: str) -> int | None:
    """On CPU the cache comes from a fixed budget (``PAGEDLLM_CPU_KVCACHE_SPACE`` GiB, default 4), as in vLLM."""
    if device != "cpu":
        return None  # sized from gpu_memory_utilization by the worker
    gib = os.environ.get("PAGEDLLM_CPU_KVCACHE_SPACE")
    return int(float(gib) * (1 << 30)) if gib else _DEFAULT_CPU_KV_CACHE_BYTES


def resolve_model_dir(model: str, revision: str | None = None, weights: bool = True) -> str:
    """Return a local path for ``model``: the directory itself, the ``.gguf`` file it designates (a ``.gguf`` path, or
    a directory holding exactly one and no HF checkpoint), or a snapshot from the Hugging Face hub."""
    gguf_file = find_gguf_file(model)
    if gguf_file is not None:
        return str(gguf_file)
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"Model path {model!r} is neither a directory nor a .gguf file")
    patterns = ["*.json", "*.jinja", "tokenizer*"] + (["*.safetensors"] if weights else [])
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # offline, unknown repo, gated repo...
        raise ValueError(
            f"Model {model!r} is neither a local directory nor downloadable from the Hugging Face hub: {exc}"
        ) from exc


def server_api_key_from_env() -> str | None:
    """The API key the OpenAI server requires when ``--api-key`` is not given (``PAGEDLLM_API_KEY``); None = none."""
    return os.environ.get("PAGEDLLM_API_KEY") or None


def admin_api_key_from_env() -> str | None:
    """The admin API's key when ``--admin-api-key`` is not given (``PAGEDLLM_ADMIN_API_KEY``); None = no admin API."""
    return os.environ.get("PAGEDLLM_ADMIN_API_KEY") or None


def runtime_lora_updating_allowed() -> bool:
    """Whether the server exposes /v1/load_lora_adapter and /v1/unload_lora_adapter:
    ``PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING`` (or vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) set to true / 1."""
    value = os.environ.get("PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING") or os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    return (value or "").strip().lower() in ("1", "true", "yes")


def log_stats_interval_from_env() -> float:
    """Seconds between the server's stats lines (``PAGEDLLM_LOG_STATS_INTERVAL``, default 10, as vLLM's)."""
    value = float(os.environ.get("PAGEDLLM_LOG_STATS_INTERVAL") or 10.0)
    if not value > 0:
        raise ValueError(f"PAGEDLLM_LOG_STATS_INTERVAL must be a positive number of seconds, got {value}")
    return value


def triton_ops_disabled_by_env() -> bool:
    """``PAGEDLLM_DISABLE_TRITON_OPS=1`` keeps the model's elementwise ops in plain torch on CUDA (to rule the
    fused kernels out when debugging numerics); read once, by ``platform.triton_ops_enabled``."""
    return os.environ.get("PAGEDLLM_DISABLE_TRITON_OPS", "0") not in ("", "0")


def lora_shrink_overlap_by_env() -> bool:
    """Whether the LoRA shrink runs beside the base GEMM inside CUDA graphs (a side-stream branch; default on).
    ``PAGEDLLM_LORA_OVERLAP_SHRINK=0`` runs it after the GEMM on the one stream, to measure or rule the overlap out."""
    return os.environ.get("PAGEDLLM_LORA_OVERLAP_SHRINK", "1") not in ("", "0")


PDL_MODES = ("0", "start", "late")


def pdl_mode_from_env() -> str:
    """``PAGEDLLM_PDL``: "start" (default: programmatic dependent launch for the Triton kernels, the next kernel
    placed right after each one's wait; "1" means the same), "late" (placed after each GEMM's and attention kernel's
    main loop) or "0" (plain stream order); read once, by ``pagedllm/pdl.py``."""
    value = os.environ.get("PAGEDLLM_PDL", "start").strip().lower() or "start"
    value = "start" if value == "1" else value
    if value not in PDL_MODES:
        raise ValueError(f"PAGEDLLM_PDL must be one of 0, 1, start, late, got {value[:20]!r}")
    return value


MOE_BACKENDS = ("triton", "torch")


def moe_backend_from_env() -> str:
    """``PAGEDLLM_MOE_BACKEND``: "triton" (default: the fused grouped-GEMM kernels on CUDA) or "torch" (the reference
    loop over experts, which syncs per expert and so needs enforce_eager on CUDA); read once, by ``model/moe``."""
    value = os.environ.get("PAGEDLLM_MOE_BACKEND", "triton").strip().lower() or "triton"
    if value not in MOE_BACKENDS:
        raise ValueError(f"PAGEDLLM_MOE_BACKEND must be one of {', '.join(MOE_BACKENDS)}, got {value[:20]!r}")
    return value


def _requested_cpu_threads(cpu_threads: int | None) -> int | None:
    """The CPU thread count the user asked for: the argument, else the environment's; None = none asked."""
    if cpu_threads is not None and cpu_threads < 1:
        raise ValueError(f"cpu_threads must be at least 1, got {cpu_threads}")
    return cpu_threads or cpu_threads_from_env()


def cpu_threads_from_env() -> int | None:
    """The intra-op thread count set by ``PAGEDLLM_CPU_THREADS`` (a bad value is an error), else by
    ``OMP_NUM_THREADS`` (which torch honours too), or None when neither is set."""
    value = os.environ.get("PAGEDLLM_CPU_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"PAGEDLLM_CPU_THREADS must be a positive integer, got {value[:20]!r}")
        return int(value)
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def replica_cuda_visible_devices(parallel: ParallelConfig) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for a data-parallel replica's engine core process: its ``world_size`` devices out of
    those visible now ($CUDA_VISIBLE_DEVICES, else 0..N-1 of ``device_count`` = the node's GPUs); None for a single
    replica (nothing to narrow). ValueError when the node has too few devices for dp x tp x pp."""
    if parallel.data_parallel_size == 1:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch  # asked by the API server process (which runs no CUDA work) before it starts the cores

        devices = [str(index) for index in range(torch.cuda.device_count())]
    else:
        devices = [device.strip() for device in visible.split(",") if device.strip()]
    first = parallel.data_parallel_rank * parallel.world_size
    needed = parallel.data_parallel_size * parallel.world_size
    if len(devices) < needed:
        raise ValueError(f"data-parallel layout {parallel.layout} needs {needed} GPUs, {len(devices)} visible")
    return ",".join(devices[first:first + parallel.world_size])
