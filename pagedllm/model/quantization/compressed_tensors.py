"""compressed-tensors checkpoints (``quant_method: "compressed-tensors"``, as llm-compressor writes them).

The config holds ``config_groups``: each a scheme (``weights`` / ``input_activations`` arguments, and a ``format``
that overrides the top-level one) with ``targets`` naming the modules it applies to, plus an ``ignore`` list. Both
name modules by their checkpoint name, exactly, by a ``re:`` regex (``re.match``, anchored at the start), or by
class: every projection of our models is an ``nn.Linear`` in the checkpoint, so the class target ``"Linear"`` covers
them all (the LM head is never quantized here: a checkpoint that quantized it fails on its unexpected scales).
A module matching several targets takes the most specific one: exact name, then regex, then class.

Schemes map to linear methods:

- FP8 weights (``type: float, num_bits: 8``, strategy tensor or channel; formats ``float-quantized`` /
  ``naive-quantized``) with FP8 input activations (dynamic per token or tensor, or static per tensor) or none:
  ``fp8.Fp8LinearMethod``;
- int4 weight-only ``pack-quantized`` (W4A16): ``compressed_tensors_w4a16.CompressedTensorsW4A16Method``;
- anything else is refused with an error naming the scheme.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

from pagedllm.model.quantization.base import LinearMethod, QuantizationConfig
from pagedllm.model.quantization.fp8 import Fp8LinearMethod, Fp8Scheme
from pagedllm.model.quantization.unquantized import UnquantizedLinearMethod

_FP8_FORMATS = ("float-quantized", "naive-quantized")
_INT4_FORMATS = ("pack-quantized",)
_LINEAR_CLASS = "Linear"  # compressed-tensors' class target for every nn.Linear


def matches(module_name: str, target: str) -> bool:
    """Whether a target (or ignore) entry names a linear projection called ``module_name`` in the checkpoint."""
    if target.startswith("re:"):
        return re.match(target[3:], module_name) is not None
    return target in (module_name, _LINEAR_CLASS)


def _specificity(target: str) -> int:
    """Lower is more specific: exact name 0, regex 1, class 2 (compressed-tensors' own order)."""
    if target.startswith("re:"):
        return 1
    return 2 if target == _LINEAR_CLASS else 0


@dataclass(frozen=True)
class SchemeGroup:
    """One entry of ``config_groups``: its name, targets, arguments and format."""

    name: str
    targets: tuple[str, ...]
    weights: dict[str, Any] | None
    input_activations: dict[str, Any] | None
    output_activations: dict[str, Any] | None
    format: str

    def describe(self) -> str:
        return (f"config group {self.name!r} (format {self.format!r}, weights {_brief(self.weights)}, "
                f"input_activations {_brief(self.input_activations)})")


def _brief(args: dict[str, Any] | None) -> str:
    if args is None:
        return "none"
    keys = ("type", "num_bits", "strategy", "dynamic", "group_size", "symmetric")
    return "{" + ", ".join(f"{k}={args.get(k)!r}" for k in keys if k in args) + "}"


class CompressedTensorsConfig(QuantizationConfig):
    """The parsed ``quantization_config`` of a compressed-tensors checkpoint; one linear method per layer."""

    name = "compressed-tensors"

    def __init__(self, groups: list[SchemeGroup], ignore: tuple[str, ...]) -> None:
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def from_config(cls, hf_config: dict[str, Any] | None) -> CompressedTensorsConfig:
        if hf_config is None:
            raise ValueError("quantization='compressed-tensors' needs a checkpoint written in that format (its "
                             "config.json has no quantization_config); to quantize a dense checkpoint at load "
                             "use quantization='fp8'")
        _check_unsupported_extras(hf_config)
        default_format = hf_config.get("format") or "dense"
        groups = [
            SchemeGroup(name, tuple(group.get("targets") or ()), group.get("weights"),
                        group.get("input_activations"), group.get("output_activations"),
                        group.get("format") or default_format)
            for name, group in (hf_config.get("config_groups") or {}).items()
        ]
        if not groups:
            raise ValueError("The compressed-tensors quantization_config has no config_groups")
        return cls(groups, tuple(hf_config.get("ignore") or ()))

    def linear_method(self, checkpoint_prefixes: list[str]) -> LinearMethod:
        groups = {prefix: self.group_for(prefix) for prefix in checkpoint_prefixes}
        if len({id(group) for group in groups.values()}) > 1:
            parts = ", ".join(f"{p}: {g.name if g else 'not quantized'}" for p, g in groups.items())
            raise ValueError(f"The parts of one fused layer are quantized differently ({parts}); pagedllm needs "
                             "q/k/v (and gate/up) quantized alike")
        group = groups[checkpoint_prefixes[0]]
        return UnquantizedLinearMethod() if group is None else method_for(group)

    def group_for(self, module_name: str) -> SchemeGroup | None:
        """The scheme group quantizing this module, None when ignored or targeted by none."""
        if any(matches(module_name, entry) for entry in self.ignore):
            return None
        best: tuple[int, SchemeGroup] | None = None
        for group in self.groups:
            for target in group.targets:
                if matches(module_name, target) and (best is None or _specificity(target) < best[0]):
                    best = (_specificity(target), group)
        return None if best is None else best[1]


def _check_unsupported_extras(hf_config: dict[str, Any]) -> None:
    if hf_config.get("sparsity_config"):
        raise ValueError("Sparse compressed-tensors checkpoints (sparsity_config) are not supported")
    if hf_config.get("transform_config"):
        raise ValueError("compressed-tensors checkpoints with transforms (transform_config) are not supported")


def method_for(group: SchemeGroup) -> LinearMethod:
    """The linear method running one scheme group; a clear error for a scheme pagedllm does not run."""
    weights = group.weights
    if weights is None:
        raise ValueError(f"Unsupported compressed-tensors scheme: {group.describe()} quantizes no weights")
    if group.output_activations is not None:
        raise ValueError(f"Unsupported compressed-tensors scheme: {group.describe()} quantizes output activations")
    if weights.get("type") == "float":
        return Fp8LinearMethod(fp8_scheme(group))
    if weights.get("type", "int") == "int" and group.format in _INT4_FORMATS and group.input_activations is None:
        return _w4a16_method(group)
    raise ValueError(f"Unsupported compressed-tensors scheme: {group.describe()}; pagedllm runs FP8 "
                     f"({'/'.join(_FP8_FORMATS)}) and int4 weight-only ({'/'.join(_INT4_FORMATS)}) schemes")


def fp8_scheme(group: SchemeGroup) -> Fp8Scheme:
    """The FP8 scheme of a float-weight group: weight scales per tensor or channel, activations per token/tensor."""
    weights = group.weights or {}
    if weights.get("num_bits") != 8:
        raise ValueError(f"Unsupported compressed-tensors scheme: {group.describe()}: float weights of "
                         f"{weights.get('num_bits')} bits (only 8-bit FP8; FP4 formats are not supported)")
    if group.format not in _FP8_FORMATS:
        raise ValueError(f"Unsupported compressed-tensors scheme: {group.describe()}: FP8 weights in format "
                         f"{group.format!r} (supported: {', '.join(_FP8_FORMATS)})")
    strategy = weights.get("strategy", "tensor")
    if strategy not in ("tensor", "channel") or weights.get("dynamic"):
        raise ValueError(f"Unsupported compressed-tensors scheme: {group.describe()}: FP8 weight strategy "
                         f"{strategy!r} (supported: static tensor or channel; block-wise FP8 is not)")
    return Fp8Scheme(is_serialized=True, weight_strategy=strategy, activations=_fp8_activations(group))


def _fp8_activations(group: SchemeGroup):
    args = group.input_activations
    if args is None:
        return "none"
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise ValueError(f"Unsupported compressed-tensors scheme: {group.describe()}: FP8 weights with "
                         f"{args.get('type')} {args.get('num_bits')}-bit activations (only FP8 activations)")
    strategy, dynamic = args.get("strategy", "tensor"), args.get("dynamic", False)
    if dynamic is True and strategy in ("token", "tensor"):
        return "dynamic_token" if strategy == "token" else "dynamic_tensor"
    if dynamic is False and strategy == "tensor":
        return "static"
    raise ValueError(f"Unsupported compressed-tensors scheme: {group.describe()}: FP8 activations with strategy "
                     f"{strategy!r}, dynamic={dynamic!r} (supported: dynamic token/tensor, static tensor)")


def _w4a16_method(group: SchemeGroup) -> LinearMethod:
    """The int4 weight-only method (``compressed_tensors_w4a16.py``, imported only when a checkpoint needs it)."""
    weights = group.weights or {}
    try:
        module = importlib.import_module("pagedllm.model.quantization.compressed_tensors_w4a16")
    except ModuleNotFoundError as exc:
        if exc.name != "pagedllm.model.quantization.compressed_tensors_w4a16":
            raise
        raise ValueError(f"compressed-tensors int4 weight-only ({group.describe()}) is not supported yet") from None
    strategy = weights.get("strategy", "group")
    group_size = weights.get("group_size") if strategy == "group" else -1
    return module.CompressedTensorsW4A16Method(
        num_bits=weights.get("num_bits", 4),
        group_size=-1 if group_size is None else group_size,
        symmetric=weights.get("symmetric", True),
        actorder=weights.get("actorder"),
    )
