"""Engine flags of the command line (DESIGN.md section 5), shared by ``pagedllm serve`` and ``pagedllm generate``,
and their translation into ``EngineArgs``."""

from __future__ import annotations

import argparse
import re
from typing import Any

from pagedllm.config import KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATION_METHODS, RUNNERS, EngineArgs

_BYTE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"4294967296"``, ``"4GiB"``, ``"4G"`` (decimal) or ``"512MiB"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 4294967296, 4GiB or 512MiB, got {text!r}")
    number, unit = match.groups()
    return int(float(number) * _BYTE_UNITS[(unit or "").lower()])


def add_engine_args(parser: argparse.ArgumentParser, serving: bool = False) -> None:
    """The engine's flags, named and defaulted as in vLLM (``serving`` adds those that only matter to a server)."""
    group = parser.add_argument_group("engine")
    group.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's)")
    group.add_argument("--revision", default=None, help="hub revision of the model (branch, tag or commit)")
    group.add_argument("--dtype", default="auto",
                       help="auto (the checkpoint's dtype on GPU, float32 on CPU), float32, bfloat16 or float16")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto = cuda when available, else cpu (default: auto)")
    if not any(action.dest == "seed" for action in parser._actions):  # a caller may have its own --seed
        group.add_argument("--seed", type=int, default=0,
                           help="seeds dummy weights and the sampling of requests that carry no seed (default: 0)")
    group.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                       help="auto (GGUF for a .gguf model, else safetensors), safetensors, gguf, or dummy (random "
                            "weights from config.json, for benchmarks) (default: auto)")
    group.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_METHODS,
                       help="weight quantization: the checkpoint's quantization_config when unset; 'fp8' also "
                            "quantizes a dense checkpoint at load (default: the checkpoint's)")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="context length limit, prompt + output (default: the model's)")
    group.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step (default: 256)")
    group.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="token budget of one step (default with chunked prefill: 8192 on GPU, 2048 on CPU)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block, a power of 2 (default: 16)")
    group.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                       help="split long prompts across steps, alongside decodes (default: on)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                       help="reuse the KV blocks of shared prompt prefixes (default: the engine's, on)")
    group.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=None,
                       help="KV cache budget, e.g. 4GiB (default on CPU: $PAGEDLLM_CPU_KVCACHE_SPACE GiB or 4 GiB; on "
                            "GPU: from --gpu-memory-utilization)")
    group.add_argument("--num-gpu-blocks-override", type=int, default=None,
                       help="exact number of KV blocks (overrides the memory budgets)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="on GPU without a byte budget: fraction of device memory for weights, activations and "
                            "KV cache (default: 0.9)")
    group.add_argument("--swap-space", type=float, default=None, metavar="GiB",
                       help="CPU memory for KV blocks swapped out by preemption, in GiB (default: 4 on GPU, 0 on CPU)")
    group.add_argument("--preemption-mode", choices=("auto", "recompute", "swap"), default="auto",
                       help="what preemption does with a request's KV blocks: recompute them later, or swap them to "
                            "the CPU space of --swap-space; auto swaps when there is swap space (default: auto)")
    if serving:
        group.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=None,
                           help="admit requests first come, first served, or by priority (default: fcfs)")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="devices to shard each layer over (tensor parallelism, Llama family) (default: 1)")
    group.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                       help="pipeline stages to split the layers into (default: 1)")
    group.add_argument("--distributed-executor-backend", choices=("uni", "mp", "ray"), default=None,
                       help="how the ranks run: mp (a process per rank on this host), ray (Ray actors, several "
                            "nodes), uni (in-process, one device) (default: uni for one rank, else mp)")
    group.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                       help="KV cache element type: auto (the model's dtype), bfloat16, fp8 (= fp8_e4m3) or fp8_e5m2; "
                            "FP8 holds twice the tokens of a 16-bit cache in the same memory (default: auto)")
    group.add_argument("--calculate-kv-scales", action="store_true",
                       help="with an FP8 KV cache: set each layer's K/V scales from the first step's keys and values "
                            "(default: the checkpoint's k_scale/v_scale, else 1.0)")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="schedule the next step while the GPU runs this one: the same outputs, with the host's "
                            "per-step work hidden behind the GPU's (default: on with CUDA, off on CPU)")
    group.add_argument("--enforce-eager", action="store_true",
                       help="never capture CUDA graphs: every step runs eagerly (slower decoding, faster start-up)")
    group.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                       help="torch threads of a model on the CPU (default: $PAGEDLLM_CPU_THREADS, else "
                            "$OMP_NUM_THREADS, else the cores not kept busy by other processes, less one for the API "
                            "server when serving)")
    group.add_argument("--structured-outputs-compile-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="how long one grammar (JSON schema, regex, EBNF) may compile before its request fails; "
                            "the compile worker is then killed and replaced (default: 30)")
    group.add_argument("--max-pending-grammars-per-client", type=int, default=4, metavar="N",
                       help="grammar compiles one client may have waiting; beyond, the server answers 429 "
                            "(default: 4)")
    group.add_argument("--runner", choices=RUNNERS, default="generate",
                       help="what the engine runs for the model: generate text, or pooling (embeddings: "
                            "/v1/embeddings, LLM.embed); one or the other (default: generate)")
    group.add_argument("--task", choices=("generate", "embed"), default=None,
                       help="the same choice under vLLM's older name: embed = --runner pooling")
    group.add_argument("--enable-lora", action="store_true",
                       help="serve LoRA adapters (PEFT format) over the base model, many in one batch")
    group.add_argument("--max-loras", type=int, default=8, metavar="N",
                       help="with --enable-lora: distinct adapters in one step (device slots; requests of other "
                            "adapters wait) (default: 8)")
    group.add_argument("--max-lora-rank", type=int, default=16, metavar="R",
                       help="with --enable-lora: the largest adapter rank accepted, a power of 2 up to 256 (every slot "
                            "is padded to it) (default: 16)")
    group.add_argument("--max-cpu-loras", type=int, default=None, metavar="N",
                       help="with --enable-lora: adapters kept loaded in CPU memory, LRU (default: --max-loras)")


# Flags whose default is "whatever the engine says": passed on only when given, so the engine's default stands.
_OPTIONAL_FLAGS = ("enable_prefix_caching", "scheduling_policy")


def engine_kwargs_from_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``EngineArgs`` / ``LLM`` (model aside) from parsed flags; flags the engine cannot honour
    yet fail here, before any loading."""
    for flag in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    kwargs = {
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "distributed_executor_backend": args.distributed_executor_backend,
        "tokenizer": args.tokenizer,
        "revision": args.revision,
        "dtype": args.dtype,
        "device": args.device,
        "seed": args.seed,
        "load_format": args.load_format,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "calculate_kv_scales": args.calculate_kv_scales,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "enable_chunked_prefill": args.enable_chunked_prefill,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
        "num_gpu_blocks_override": args.num_gpu_blocks_override,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "swap_space": args.swap_space,
        "preemption_mode": args.preemption_mode,
        "enforce_eager": args.enforce_eager,
        "cpu_threads": args.cpu_threads,
        "async_scheduling": args.async_scheduling,
        "structured_outputs_compile_timeout": args.structured_outputs_compile_timeout,
        "max_pending_grammars_per_client": args.max_pending_grammars_per_client,
        "enable_lora": args.enable_lora or bool(getattr(args, "lora_modules", None)),
        "max_loras": args.max_loras,
        "max_lora_rank": args.max_lora_rank,
        "max_cpu_loras": args.max_cpu_loras,
        "runner": getattr(args, "runner", "generate"),
        "task": getattr(args, "task", None),
    }
    for name in _OPTIONAL_FLAGS:
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def engine_args_from_cli(args: argparse.Namespace, model: str) -> EngineArgs:
    """``EngineArgs`` from parsed flags (see ``engine_kwargs_from_cli``)."""
    return EngineArgs(model=model, **engine_kwargs_from_cli(args))
