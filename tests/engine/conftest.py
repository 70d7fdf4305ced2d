"""Models shared by the engine tests."""

from __future__ import annotations

import pytest

from tests.entrypoints.conftest import save_bpe_tokenizer
from tests.utils import build_tiny_model


@pytest.fixture(scope="session")
def tokenized_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama with a trained BPE tokenizer (text prompts, stop strings and grammars need one)."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tokenized_llama"), "llama", vocab_size=320)
    save_bpe_tokenizer(model_dir, 300)
    return model_dir
