"""How a model pools: read once from the model directory (sentence-transformers' files), else last-token + L2.

Sentence-transformers models name their modules in ``modules.json``; the ``sentence_transformers.models.Pooling``
module's folder (``1_Pooling`` usually) holds ``config.json`` with ``pooling_mode_*`` flags, and a
``sentence_transformers.models.Normalize`` module in the list means the vectors are L2-normalized. Qwen3-Embedding
ships exactly that (last token + Normalize), which is also the default when the files are absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOLING_TYPES = ("LAST", "MEAN", "CLS")  # CLS = the first token's state
# sentence-transformers' flag -> our pooling type (the first one set wins, in this order).
_ST_POOLING_FLAGS = (("pooling_mode_lasttoken", "LAST"), ("pooling_mode_mean_tokens", "MEAN"),
                     ("pooling_mode_cls_token", "CLS"))
_ST_POOLING_MODULE = "sentence_transformers.models.Pooling"
_ST_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class PoolerConfig:
    """The model's pooling: the type, whether vectors are L2-normalized by default, and the Matryoshka sizes it
    was trained for (None: any size up to the hidden size)."""

    pooling_type: str = "LAST"
    normalize: bool = True
    matryoshka_dimensions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")


def load_pooler_config(model_dir: str, override: PoolerConfig | None = None) -> PoolerConfig:
    """The pooling of the model in ``model_dir``: ``override`` if given, else sentence-transformers' settings
    where present, else last-token with normalization. Matryoshka sizes come from ``config.json``."""
    if override is not None:
        return override
    matryoshka = _matryoshka_dimensions(_read_json(Path(model_dir) / "config.json") or {})
    modules = _read_json(Path(model_dir) / "modules.json")
    if not isinstance(modules, list):
        return PoolerConfig(matryoshka_dimensions=matryoshka)
    return PoolerConfig(_st_pooling_type(model_dir, modules), _st_normalizes(modules), matryoshka)


def _st_pooling_type(model_dir: str, modules: list[dict[str, Any]]) -> str:
    pooling = next((m for m in modules if m.get("type") == _ST_POOLING_MODULE), None)
    settings = _read_json(Path(model_dir) / pooling.get("path", "1_Pooling") / "config.json") if pooling else None
    if not isinstance(settings, dict):
        return "LAST"
    for flag, pooling_type in _ST_POOLING_FLAGS:
        if settings.get(flag):
            return pooling_type
    flags = [key for key, value in settings.items() if key.startswith("pooling_mode") and value]
    raise ValueError(f"Unsupported sentence-transformers pooling in {model_dir!r}: {flags}; supported: "
                     "pooling_mode_lasttoken, pooling_mode_mean_tokens, pooling_mode_cls_token")


def _st_normalizes(modules: list[dict[str, Any]]) -> bool:
    return any(m.get("type") == _ST_NORMALIZE_MODULE for m in modules)


def _matryoshka_dimensions(hf_config: dict[str, Any]) -> tuple[int, ...] | None:
    value = hf_config.get("matryoshka_dimensions")
    return tuple(sorted(int(d) for d in value)) if value else None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None
