"""A checkpoint saved from HF's base model (``AutoModel``: weights without the ``model.`` prefix, no ``lm_head``, a
``Qwen3Model`` architecture), as sentence-transformers exports and the Qwen3-Embedding layout are: an embedding
engine loads it and its vectors equal HF's pooled ``last_hidden_state``; a generating engine refuses it clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from pagedllm import LLM, PoolingParams
from tests.entrypoints.conftest import save_bpe_tokenizer
from tests.utils import _BASE, TINY_MODEL_VARIANTS, _randomize

KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=64, max_model_len=64, max_num_batched_tokens=8,
              max_num_seqs=4)
PROMPTS = ["Once upon a time there was a little model", "The quick brown fox jumps over the lazy dog.", "Paged"]


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> str:
    """A tiny random Qwen3 base model (untied embeddings, so no head can be made from them) with a BPE tokenizer."""
    import transformers

    _, overrides = TINY_MODEL_VARIANTS["qwen3"]
    config = transformers.Qwen3Config(**{**_BASE, **overrides, "vocab_size": 320})
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, dtype=torch.float32)
    _randomize(model, 0)
    out = tmp_path_factory.mktemp("base_model") / "qwen3-base"
    model.save_pretrained(out, safe_serialization=True)
    save_bpe_tokenizer(str(out), 300)
    return str(out)


def test_checkpoint_is_prefix_less_and_headless(base_model_dir):
    with safe_open(f"{base_model_dir}/model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "embed_tokens.weight" in names and "norm.weight" in names
    assert any(name.startswith("layers.0.") for name in names)
    assert not any(name.startswith(("model.", "lm_head")) for name in names)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_base_model_checkpoint_embeds_as_hf(base_model_dir, pooling_type):
    import transformers

    hf = transformers.AutoModel.from_pretrained(base_model_dir, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    llm = LLM(base_model_dir, task="embed", **KWARGS)
    outputs = llm.embed(PROMPTS, PoolingParams(pooling_type=pooling_type), use_tqdm=False)
    for output in outputs:
        with torch.no_grad():
            hidden = hf(torch.tensor([output.prompt_token_ids])).last_hidden_state[0]
        reference = F.normalize(hidden[-1] if pooling_type == "LAST" else hidden.mean(dim=0), dim=0)
        vector = torch.tensor(output.outputs.embedding)
        assert F.cosine_similarity(vector, reference, dim=0).item() > 0.9999
    assert not hasattr(llm.llm_engine.engine_core.model_runner.model.lm_head, "weight")  # no head built


def test_generating_engine_refuses_a_headless_checkpoint(base_model_dir):
    with pytest.raises(ValueError, match="no LM head.*--runner pooling"):
        LLM(base_model_dir, **KWARGS)
