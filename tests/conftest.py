"""Session-wide test setup, loaded before any test module."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from tests.utils import build_tiny_model

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels are tested in Triton's interpreter, and TRITON_INTERPRET must be set before
    # triton itself is first imported (its own library functions are decorated then), which some test modules do
    # indirectly. Harmless elsewhere: CPU code paths never launch Triton kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``tiny_model_dir(arch)`` -> directory of that tiny HF model variant (``tests.utils.TINY_MODEL_VARIANTS``),
    written on first use and shared by the whole session (treat it as read-only)."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_model(root, arch)
        return built[arch]

    return get
