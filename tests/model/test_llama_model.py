"""pagedllm's Llama-family model against HF transformers, in float32, through the paged KV cache."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pagedllm.config import ModelConfig
from pagedllm.model.loader import get_model
from tests.utils import TINY_MODEL_VARIANTS, PagedRunner, load_hf_model

VARIANTS = list(TINY_MODEL_VARIANTS)
ATOL = 1e-4


def prompt(length: int, seed: int, vocab_size: int = 128) -> list[int]:
    return torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf_model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([token_ids])).logits[0].float()


def load_pair(model_dir: str, dtype: str = "float32") -> tuple[torch.nn.Module, torch.nn.Module]:
    model = get_model(ModelConfig.from_pretrained(model_dir, None, dtype=dtype), "auto", "cpu")
    return model, load_hf_model(model_dir)


@pytest.mark.parametrize("arch", VARIANTS)
def test_whole_prompt_matches_hf(tiny_model_dir: Callable[[str], str], arch: str) -> None:
    model, hf = load_pair(tiny_model_dir(arch))
    ids = prompt(29, seed=1)
    logits = PagedRunner(model, block_size=4).step([("a", ids)])
    expected = hf_logits(hf, ids)
    assert expected.std() > 0.5  # the tiny model is not degenerate: a wrong rotary or mask shows far above ATOL
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", VARIANTS)
def test_chunked_prefill_then_decode_matches_hf(tiny_model_dir: Callable[[str], str], arch: str) -> None:
    model, hf = load_pair(tiny_model_dir(arch))
    ids = prompt(26, seed=2)
    runner = PagedRunner(model, block_size=4, seed=5)
    outputs = [runner.step([("a", ids[:7])]), runner.step([("a", ids[7:18])])]
    outputs += [runner.step([("a", [token])]) for token in ids[18:]]
    torch.testing.assert_close(torch.cat(outputs), hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", VARIANTS)
def test_mixed_batch_equals_each_request_alone(tiny_model_dir: Callable[[str], str], arch: str) -> None:
    model, hf = load_pair(tiny_model_dir(arch))
    a, b, c = prompt(13, seed=3), prompt(10, seed=4), prompt(11, seed=5)
    runner = PagedRunner(model, block_size=4, seed=6)
    runner.step([("a", a[:5]), ("b", b[:9])])  # earlier step: a's first chunk, b's whole prompt
    # One step: a's second chunk over its cached prefix, b's decode, c's whole prompt.
    logits = runner.step([("a", a[5:]), ("b", b[9:]), ("c", c)])
    assert logits.shape == (8 + 1 + 11, 128)
    torch.testing.assert_close(logits[:8], hf_logits(hf, a)[5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[8:9], hf_logits(hf, b)[9:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[9:], hf_logits(hf, c), atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [1, 16])
def test_block_sizes(tiny_model_dir: Callable[[str], str], block_size: int) -> None:
    model, hf = load_pair(tiny_model_dir("qwen3"))
    ids = prompt(21, seed=7)
    runner = PagedRunner(model, block_size=block_size, num_blocks=32)
    logits = torch.cat([runner.step([("a", ids[:17])]), runner.step([("a", ids[17:])])])
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(tiny_model_dir: Callable[[str], str], dtype: str) -> None:
    model, hf = load_pair(tiny_model_dir("qwen2"), dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    ids = prompt(12, seed=8)
    logits = PagedRunner(model).step([("a", ids)])
    expected = hf_logits(hf, ids)
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()
