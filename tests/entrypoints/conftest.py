"""Models for the end-to-end tests: tiny random HF models (with a trained BPE tokenizer) and the real stories260K."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.utils import ASSETS, STORIES, build_tiny_model

_CORPUS = [
    "Once upon a time there was a little model that generated text for many users at once.",
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the cache in blocks.",
    "Caf\u00e9, na\u00efve, d\u00e9j\u00e0 vu; \u6f22\u5b57 and emoji \U0001F600 appear too.",
] * 20


def save_bpe_tokenizer(model_dir: str, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer on a small corpus and save it next to the model (vocab <= model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    wrapped.save_pretrained(model_dir)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``tiny_model(arch)`` -> directory of a tiny random model with a 300-token BPE tokenizer."""
    root = tmp_path_factory.mktemp("e2e_models")
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            model_dir = build_tiny_model(root, arch, vocab_size=320)
            save_bpe_tokenizer(model_dir, 300)
            built[arch] = model_dir
        return built[arch]

    return get


@pytest.fixture(scope="session")
def stories_dir() -> str:
    if not STORIES.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return str(STORIES)


@torch.no_grad()
def hf_greedy(hf_model, prompt_token_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """HF transformers reference: greedy tokens (eos not special) and the logprob of each chosen token."""
    output = hf_model(torch.tensor([prompt_token_ids]), use_cache=True)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = output.logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
        output = hf_model(torch.tensor([[token]]), past_key_values=output.past_key_values, use_cache=True)
    return tokens, logprobs
