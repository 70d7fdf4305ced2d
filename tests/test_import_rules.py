"""The import directions of DESIGN.md section 2, checked on the source (every import, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pagedllm"

# package -> modules it must never import (prefix match)
FORBIDDEN = {
    "core": ("torch", "numpy", "pagedllm.worker", "pagedllm.model", "pagedllm.engine", "pagedllm.attention",
             "pagedllm.entrypoints"),
    "attention": ("pagedllm.worker", "pagedllm.engine", "pagedllm.entrypoints"),
    "model": ("pagedllm.worker", "pagedllm.engine", "pagedllm.entrypoints"),
    "worker": ("pagedllm.engine", "pagedllm.entrypoints"),
    "engine": ("pagedllm.entrypoints",),
    "lora": ("pagedllm.worker", "pagedllm.engine", "pagedllm.entrypoints", "pagedllm.core"),
    "entrypoints": ("pagedllm.worker", "pagedllm.attention"),
}


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_import_directions(package):
    violations = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for name in imported_modules(path)
        if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[package])
    ]
    assert not violations, "\n".join(violations)


def test_leaf_modules_load_without_torch():
    """Leaves may import torch lazily inside a function (platform.py does, to ask for CUDA), never at load time."""
    for leaf in ("config.py", "params.py", "platform.py", "core/interface.py"):
        top_level = imported_modules(PACKAGE / leaf, top_level_only=True)
        assert not {n for n in top_level if n.split(".")[0] in ("torch", "numpy")}, leaf
