"""A tiny random llama with a trained byte-level BPE tokenizer (vocab 300 padded to the model's 320)."""

from __future__ import annotations

import pytest

from pagedllm import LLM
from tests.entrypoints.conftest import save_bpe_tokenizer
from tests.utils import build_tiny_model


@pytest.fixture(scope="session")
def so_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    model_dir = build_tiny_model(tmp_path_factory.mktemp("so_models"), "llama", vocab_size=320)
    save_bpe_tokenizer(model_dir, 300)
    return model_dir


@pytest.fixture(scope="module")
def llm(so_model_dir: str) -> LLM:
    return LLM(so_model_dir, device="cpu", block_size=4, num_gpu_blocks_override=2048, max_model_len=256,
               max_num_seqs=64)
