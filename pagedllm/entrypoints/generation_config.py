"""Request defaults: the sampling values a request gets for the fields it leaves unset, as vLLM's
``--generation-config``: ``auto`` reads the model's ``generation_config.json`` (temperature, top_p, top_k, min_p,
repetition_penalty, and max_new_tokens as max_tokens), ``vllm`` ignores it (the engine's own defaults), a directory
reads that directory's file. The server bounds a reply's length even when neither the request nor the model does
(``--max-tokens-default``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pagedllm.params import SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"
# generation_config.json key -> SamplingParams field: the keys vLLM reads, no others.
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# A reply's length when neither the request, the model nor --max-tokens-default sets one: long enough for a chat
# answer, short enough that a CPU server (10-20 tokens/s on a small model) answers within about a minute.
DEFAULT_SERVING_MAX_TOKENS = 1024


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults for the sampling fields a request leaves unset (None: the engine's own default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # None: the caller's own default (16 offline; the rest of the context)

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def sampling_params(self) -> SamplingParams:
        """``SamplingParams`` of a request that sets nothing (offline, ``LLM.generate`` without sampling_params)."""
        return SamplingParams(**self.as_dict())


def load_generation_defaults(source: str, model_path: str) -> GenerationDefaults:
    """The defaults of ``source``: ``"auto"`` (the model's generation_config.json, if it has one; for a ``.gguf`` file,
    the one beside it), ``"vllm"`` (none) or a directory holding a generation_config.json. A value that
    SamplingParams refuses is a ValueError naming the file."""
    if source == "vllm":
        return GenerationDefaults()
    path = _config_path(source, model_path)
    if path is None:
        return GenerationDefaults()
    defaults = GenerationDefaults(**_read_fields(path))
    try:
        defaults.sampling_params()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return defaults


def serving_defaults(defaults: GenerationDefaults, max_tokens_default: int | None) -> GenerationDefaults:
    """The server's defaults: ``--max-tokens-default`` (0: no bound but the context) wins over the model's
    max_new_tokens, which wins over ``DEFAULT_SERVING_MAX_TOKENS``."""
    if max_tokens_default is not None and max_tokens_default < 0:
        raise ValueError(f"--max-tokens-default must be 0 (no bound) or positive, got {max_tokens_default}")
    if max_tokens_default is None:
        max_tokens_default = defaults.max_tokens or DEFAULT_SERVING_MAX_TOKENS
    return GenerationDefaults(**{**asdict(defaults), "max_tokens": max_tokens_default or None})


def _config_path(source: str, model_path: str) -> Path | None:
    if source != "auto":
        path = Path(source) / GENERATION_CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"--generation-config {source!r}: no {GENERATION_CONFIG_FILE} there (give 'auto', "
                             "'vllm' or a directory holding one)")
        return path
    model = Path(model_path)
    path = (model.parent if model.is_file() else model) / GENERATION_CONFIG_FILE
    return path if path.is_file() else None


def _read_fields(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return {field: config[key] for key, field in _FIELDS.items() if config.get(key) is not None}
