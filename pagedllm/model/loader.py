"""Build a model from a ``ModelConfig``: pick the class by architecture, then fill its weights from safetensors
files (single or sharded), a GGUF file (dequantized tensor by tensor, see ``model/gguf.py``) or with seeded random
values (``load_format="dummy"``, for benchmarks).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pagedllm.attention.backend import get_attention_backend
from pagedllm.config import LOAD_FORMATS, ModelConfig
from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.model.gguf import is_gguf_model, iterate_gguf_weights
from pagedllm.model.kv_scales import checkpoint_kv_scale_name
from pagedllm.model.layers import PPMissingLayer
from pagedllm.model.linear import default_weight_loader
from pagedllm.model.quantization import get_quantization_config
from pagedllm.model.registry import model_class as model_class_for

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DUMMY_SEED = 0
_DUMMY_STD = 0.02
_MAX_NAMES_SHOWN = 5


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a dtype name of ``ModelConfig`` ("float32", "float16", "bfloat16")."""
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def get_model(
    model_config: ModelConfig, load_format: str, device: str, attn_backend_name: str = "torch", pooling: bool = False
) -> nn.Module:
    """Build the model on ``device`` in the config's dtype, load its weights, and return it in eval mode.

    ``pooling``: for an embedding engine, which never computes logits: the model gets no LM head (a checkpoint's
    ``lm_head`` is skipped, and a base-model checkpoint without one loads)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    weights = None if load_format == "dummy" else _iterate_checkpoint(model_config.model, load_format)
    _check_quantized_checkpoint(model_config, load_format)
    model = build_model(model_config, device, attn_backend_name)
    if pooling:
        # Built and dropped at once (each family builds its head in its constructor): a tied head holds no memory
        # of its own, an untied one is freed before any weight is loaded.
        model.lm_head = PPMissingLayer()
    if weights is None:
        init_dummy_weights(model)
    else:
        load_weights(model, weights)
    process_weights_after_loading(model)
    return model.eval().requires_grad_(False)


def build_model(model_config: ModelConfig, device: str, attn_backend_name: str = "torch") -> nn.Module:
    """The model's modules with uninitialized parameters on ``device`` (``"meta"``: shapes and dtypes only, e.g.
    to count weight bytes), created there directly in the config's dtype: no float32 copy of a big model in RAM."""
    model_class = model_class_for(model_config.architecture)
    state = get_parallel_state()
    if (state.tp.size > 1 or state.pp.size > 1) and not model_class.__dict__.get("supports_parallel", False):
        raise ValueError(f"{model_config.architecture} does not support tensor or pipeline parallelism yet (the "
                         "Llama family, Gemma 2 / 3 and Phi-3 do); run it with tensor_parallel_size=1 "
                         "and pipeline_parallel_size=1")
    with torch.device(device), _default_dtype(torch_dtype(model_config.dtype)):
        return model_class(model_config, get_attention_backend(attn_backend_name),
                           get_quantization_config(model_config))


def _check_quantized_checkpoint(model_config: ModelConfig, load_format: str) -> None:
    """Only FP8 quantizes a dense checkpoint at load; the other schemes need a checkpoint written in them (or dummy
    weights, for benchmarks)."""
    method = model_config.quantization
    if method in (None, "fp8") or model_config.quantization_config is not None or load_format == "dummy":
        return
    raise ValueError(f"quantization={method!r} needs a checkpoint quantized with it (its config.json has no "
                     "quantization_config); only 'fp8' quantizes a dense checkpoint at load")


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every quantized layer repack (or quantize) its loaded parameters for its kernel."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def _iterate_checkpoint(model_path: str, load_format: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) stream of the checkpoint; ``"auto"`` picks GGUF for a ``.gguf`` model, else safetensors."""
    is_gguf = is_gguf_model(model_path)
    if load_format == "auto":
        load_format = "gguf" if is_gguf else "safetensors"
    if (load_format == "gguf") != is_gguf:
        kind = "a GGUF model" if is_gguf else "not a GGUF model"
        raise ValueError(f"load_format={load_format!r} does not fit {model_path!r}, which is {kind}")
    return iterate_gguf_weights(model_path) if is_gguf else iterate_safetensors(model_path)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def safetensors_files(model_dir: str) -> list[Path]:
    """The checkpoint's ``*.safetensors`` files: those named by ``model.safetensors.index.json``, else all of them."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in names if not (root / name).is_file()]
        if missing:
            raise ValueError(f"{index} names weight files that do not exist: {', '.join(missing)}")
        return [root / name for name in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"No *.safetensors weights in {model_dir!r} (only safetensors checkpoints are supported; "
            "use load_format='dummy' for random weights)"
        )
    return files


def iterate_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) over the checkpoint, one tensor at a time on the CPU to keep peak memory low."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, f.get_tensor(name)


def _expected_checkpoint_names(model: nn.Module) -> set[str]:
    """The checkpoint names that must be present: every parameter, fused ones expanded to their HF parts."""
    stacked = getattr(model, "stacked_params_mapping", [])
    expected: set[str] = set()
    for param_name, param in model.named_parameters():  # tied weights are listed once, under the embedding
        if getattr(param, "optional_in_checkpoint", False):  # e.g. FP8 KV cache scales: 1.0 when absent
            continue
        parts = [param_name.replace(fused, part) for fused, part, _ in stacked if fused in param_name]
        expected.update(parts or [param_name])
    return expected


# The top-level modules of HF's base model (``AutoModel``), which a causal LM holds under ``model.``.
_BASE_MODEL_ROOTS = ("embed_tokens.", "layers.", "norm.")


def _model_name(name: str) -> str:
    """The causal-LM name of a checkpoint tensor: a base-model checkpoint (saved from HF's ``AutoModel``, e.g. a
    sentence-transformers export or the Qwen3-Embedding layout) names ``layers.0...`` what the model holds as
    ``model.layers.0...``."""
    return f"model.{name}" if name.startswith(_BASE_MODEL_ROOTS) else name


def _skip(name: str, model: nn.Module) -> bool:
    # Old checkpoints store rotary inverse frequencies, which we compute; tied checkpoints may still carry lm_head.
    if "rotary_emb.inv_freq" in name:
        return True
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model through each parameter's ``weight_loader``.

    Raises ``ValueError`` naming a few offenders when the checkpoint has weights the model lacks, or lacks some.
    """
    params = dict(model.named_parameters())
    stacked = getattr(model, "stacked_params_mapping", [])
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        name = _model_name(name)
        if _skip(name, model):
            continue
        name = checkpoint_kv_scale_name(name)  # before the fused names: "k_proj.output_scale" is no k_proj shard
        if name is None:
            continue
        param_name, shard_id = name, None
        for fused, part, shard in stacked:
            if part in name:
                param_name, shard_id = name.replace(part, fused), shard
                break
        param = params.get(param_name)
        if param is None:
            if not _on_other_stage(model, param_name):
                unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"Cannot load checkpoint weight {name!r}: {exc}") from exc
        loaded.add(name)
    if unexpected:
        raise ValueError(f"Checkpoint has {len(unexpected)} weights the model does not: {_few(unexpected)}")
    missing = _expected_checkpoint_names(model) - loaded
    if missing == {"lm_head.weight"}:
        raise ValueError("This checkpoint has no LM head (no lm_head.weight, and its embeddings are not tied): it is "
                         "a base model, e.g. an embedding model, and cannot generate text; serve it with --runner "
                         "pooling (LLM(..., task='embed'))")
    if missing:
        raise ValueError(f"Checkpoint is missing {len(missing)} weights: {_few(missing)}")


def _on_other_stage(model: nn.Module, param_name: str) -> bool:
    """Whether the parameter sits under a module another pipeline stage holds (a ``PPMissingLayer`` here)."""
    module = model
    for part in param_name.split(".")[:-1]:
        module = getattr(module, part, None)
        if module is None:
            return False
        if isinstance(module, PPMissingLayer):
            return True
    return False


def _few(names: list[str] | set[str]) -> str:
    names = sorted(names)
    more = f" (and {len(names) - _MAX_NAMES_SHOWN} more)" if len(names) > _MAX_NAMES_SHOWN else ""
    return ", ".join(names[:_MAX_NAMES_SHOWN]) + more


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = _DUMMY_SEED) -> None:
    """Random weights from the config alone: norm weights 1, everything else N(0, 0.02^2), seeded."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        dummy_init = getattr(param, "dummy_init", None)
        if dummy_init is not None:  # quantized parameters: packed integers, scales (see quantization/base.py)
            dummy_init(param.data, generator)
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, _DUMMY_STD, generator=generator)
