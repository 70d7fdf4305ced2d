"""Quantized linear layers: the scheme's ``QuantizationConfig`` picks a ``LinearMethod`` per layer (see ``base.py``).

``ModelConfig.quantization`` names the scheme (from ``--quantization`` or the checkpoint's ``quantization_config``);
each scheme's module is imported only when a model uses it.
"""

from __future__ import annotations

import importlib
from typing import Any

from pagedllm.config import QUANTIZATION_METHODS, ModelConfig
from pagedllm.model.quantization.base import QuantizationConfig

# Scheme name -> "module:class" of its QuantizationConfig; the names are config.QUANTIZATION_METHODS.
_CONFIG_CLASSES = {
    "fp8": "pagedllm.model.quantization.fp8:Fp8Config",
    "gptq": "pagedllm.model.quantization.gptq:GPTQConfig",
    "awq": "pagedllm.model.quantization.awq:AWQConfig",
    "compressed-tensors": "pagedllm.model.quantization.compressed_tensors:CompressedTensorsConfig",
}
assert set(_CONFIG_CLASSES) == set(QUANTIZATION_METHODS)


def get_quantization_config(model_config: ModelConfig) -> QuantizationConfig | None:
    """The model's quantization scheme, built from the checkpoint's ``quantization_config`` (None: dense model)."""
    if model_config.quantization is None:
        return None
    module_name, class_name = _CONFIG_CLASSES[model_config.quantization].split(":")
    config_class: Any = getattr(importlib.import_module(module_name), class_name)
    return config_class.from_config(model_config.quantization_config)
