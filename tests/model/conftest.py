"""Tiny HF models, built once per test session and shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.utils import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``tiny_model_dir(arch)`` -> directory of that variant, written on first use (treat it as read-only)."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_model(root, arch)
        return built[arch]

    return get
