"""A tiny model for the bench tests: only its config.json matters (the bench runs it with random weights); its
vocabulary covers the workloads' token ids (up to 10,000) and its context the nano workload's longest request."""

from __future__ import annotations

import pytest

from tests.utils import build_tiny_model


@pytest.fixture(scope="session")
def bench_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("bench-model"), "qwen3", vocab_size=10240,
                            max_position_embeddings=2048)
