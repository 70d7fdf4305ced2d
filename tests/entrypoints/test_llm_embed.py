"""LLM.embed end to end on tiny random Qwen3 and Llama models: the pooled vectors equal HF transformers' pooled
``last_hidden_state`` (float32, cosine > 0.9999) for every pooling type, with and without normalization, with
prompts split over chunked-prefill steps, in a batch, with prefix-cache hits, under preemption and async
scheduling; Matryoshka dimensions; truncation; no KV block left allocated afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pagedllm import LLM, PoolingParams, SamplingParams

# max_num_batched_tokens 8: every prompt below spans several chunked-prefill steps, and steps mix requests.
KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=96, max_model_len=64, max_num_batched_tokens=8,
              max_num_seqs=4)
PROMPTS = [
    "Once upon a time there was a little model",
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the cache in blocks.",
    "Caf\u00e9",
    "Paged",
]
POOLING_TYPES = ("LAST", "MEAN", "CLS")


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def embed_llm(tiny_model, arch) -> LLM:
    return LLM(tiny_model(arch), task="embed", **KWARGS)


@pytest.fixture(scope="module")
def hf_base(tiny_model, arch):
    import transformers

    return transformers.AutoModel.from_pretrained(tiny_model(arch), dtype=torch.float32,
                                                  attn_implementation="eager").eval()


@torch.no_grad()
def hf_pooled(hf_base, token_ids: list[int], pooling_type: str, normalize: bool = True,
              dimensions: int | None = None) -> torch.Tensor:
    """The reference: HF's base-model last_hidden_state of the prompt, pooled as pagedllm documents."""
    hidden = hf_base(torch.tensor([token_ids])).last_hidden_state[0].float()
    vector = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[pooling_type]
    if dimensions is not None:
        vector = vector[:dimensions]
    return F.normalize(vector, dim=0) if normalize else vector


def assert_matches(output, reference: torch.Tensor) -> None:
    vector = torch.tensor(output.outputs.embedding)
    assert vector.shape == reference.shape
    assert F.cosine_similarity(vector, reference, dim=0).item() > 0.9999
    torch.testing.assert_close(vector.norm(), reference.norm(), rtol=1e-4, atol=1e-5)


def assert_no_kv_left(llm: LLM) -> None:
    core = llm.llm_engine.engine_core
    assert not core.scheduler.has_unfinished_requests()
    kv = core.scheduler.kv_cache_manager
    assert kv.num_free_blocks == core.num_blocks
    assert kv.usage == 0.0
    # (The runner forgets finished requests with the next step's diff; partial sums go as the prompt completes.)
    assert not core.model_runner.pooler._partials


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pooling_type", POOLING_TYPES)
def test_embeddings_equal_hf_pooled_hidden_states(embed_llm, hf_base, pooling_type, normalize):
    params = PoolingParams(pooling_type=pooling_type, normalize=normalize)
    outputs = embed_llm.embed(PROMPTS, params, use_tqdm=False)
    assert [o.request_id for o in outputs] == sorted((o.request_id for o in outputs), key=int)
    assert max(len(o.prompt_token_ids) for o in outputs) > 2 * KWARGS["max_num_batched_tokens"]  # chunked
    for output in outputs:
        assert output.finished and output.error is None
        assert_matches(output, hf_pooled(hf_base, output.prompt_token_ids, pooling_type, normalize))
    assert_no_kv_left(embed_llm)


def test_default_is_last_token_normalized_and_token_id_prompts(embed_llm, hf_base):
    token_ids = [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 18, 9]
    [output] = embed_llm.embed({"prompt_token_ids": token_ids}, use_tqdm=False)
    assert output.prompt_token_ids == token_ids
    assert_matches(output, hf_pooled(hf_base, token_ids, "LAST"))
    assert abs(torch.tensor(output.outputs.embedding).norm().item() - 1.0) < 1e-5


def test_mixed_pooling_types_in_one_batch_with_prefix_cache_hits(embed_llm, hf_base):
    """A shared 36-token prefix: the second round's last-token requests hit the prefix cache (fewer prompt tokens
    computed), the mean / CLS ones never take hits (they need every position), and all still match HF."""
    prefix = [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 18] * 3
    prompts = [{"prompt_token_ids": prefix + [30 + i, 40 + i]} for i in range(6)]
    params = [PoolingParams(pooling_type=POOLING_TYPES[i % 3]) for i in range(6)]
    scheduler = embed_llm.llm_engine.engine_core.scheduler
    for _ in range(2):
        hits_before = scheduler.prefix_cache_hits
        outputs = embed_llm.embed(prompts, params, use_tqdm=False)
        for output, p in zip(outputs, params):
            assert_matches(output, hf_pooled(hf_base, output.prompt_token_ids, p.pooling_type))
    assert scheduler.prefix_cache_hits - hits_before >= 2 * 32  # both LAST prompts of round two hit 32+ tokens
    assert_no_kv_left(embed_llm)


def test_matryoshka_dimensions(embed_llm, hf_base):
    outputs = embed_llm.embed(PROMPTS[:2], PoolingParams(dimensions=16), use_tqdm=False)
    for output in outputs:
        assert len(output.outputs.embedding) == 16
        assert_matches(output, hf_pooled(hf_base, output.prompt_token_ids, "LAST", dimensions=16))
    unnormalized = embed_llm.embed(PROMPTS[0], PoolingParams(dimensions=8, normalize=False), use_tqdm=False)[0]
    assert_matches(unnormalized, hf_pooled(hf_base, unnormalized.prompt_token_ids, "LAST", False, dimensions=8))
    hidden_size = embed_llm.llm_engine.config.model_config.hidden_size
    with pytest.raises(ValueError, match="dimensions"):
        embed_llm.embed(PROMPTS[0], PoolingParams(dimensions=hidden_size + 1), use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)


def test_truncation_and_too_long_inputs(embed_llm, hf_base):
    long_ids = list(range(3, 3 + 80))  # longer than max_model_len 64
    with pytest.raises(ValueError, match="max_model_len"):
        embed_llm.embed({"prompt_token_ids": long_ids}, use_tqdm=False)
    [kept] = embed_llm.embed({"prompt_token_ids": long_ids}, truncate_prompt_tokens=20, use_tqdm=False)
    assert kept.prompt_token_ids == long_ids[-20:]
    assert_matches(kept, hf_pooled(hf_base, long_ids[-20:], "LAST"))
    [whole] = embed_llm.embed({"prompt_token_ids": long_ids}, PoolingParams(truncate_prompt_tokens=-1),
                              use_tqdm=False)
    assert whole.prompt_token_ids == long_ids[-64:]
    with pytest.raises(ValueError, match="empty"):
        embed_llm.embed({"prompt_token_ids": []}, use_tqdm=False)
    assert_no_kv_left(embed_llm)


def test_an_engine_generates_or_embeds_never_both(embed_llm, tiny_model, arch):
    with pytest.raises(ValueError, match="runner"):
        embed_llm.generate("Once", SamplingParams(max_tokens=2), use_tqdm=False)
    generator = LLM(tiny_model(arch), **KWARGS)
    with pytest.raises(ValueError, match="pooling"):
        generator.embed("Once", use_tqdm=False)
    with pytest.raises(ValueError, match="contradicts"):
        LLM(tiny_model(arch), task="generate", runner="pooling", **KWARGS)


@pytest.mark.parametrize("pooling_type", ["MEAN", "LAST"])
def test_preemption_and_async_scheduling(tiny_model, hf_base, arch, pooling_type):
    """Few KV blocks: long prompts preempt each other mid-prefill (recomputed from the start, partial sums
    dropped); async scheduling plans a step while the last one runs. Vectors still match."""
    kwargs = {**KWARGS, "num_gpu_blocks_override": 18, "max_num_batched_tokens": 12}
    llm = LLM(tiny_model(arch), runner="pooling", async_scheduling=True, **kwargs)
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 290 + 3 for j in range(50 + i)]} for i in range(4)]
    outputs = llm.embed(prompts, PoolingParams(pooling_type=pooling_type), use_tqdm=False)
    for output in outputs:
        assert_matches(output, hf_pooled(hf_base, output.prompt_token_ids, pooling_type))
    assert llm.llm_engine.engine_core.scheduler.num_preemptions_total > 0
    assert_no_kv_left(llm)


def _write_sentence_transformers_files(model_dir: Path, mode_flag: str, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    flags = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": False}
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                      **flags, mode_flag: True}))


def test_pooling_read_from_sentence_transformers_files(tiny_model, hf_base, arch, tmp_path):
    import shutil

    model_dir = tmp_path / "st-model"
    shutil.copytree(tiny_model(arch), model_dir)
    _write_sentence_transformers_files(model_dir, "pooling_mode_mean_tokens", normalize=False)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [8, 32]}))
    llm = LLM(str(model_dir), task="embed", **KWARGS)
    pooler = llm.llm_engine.config.pooler_config
    assert (pooler.pooling_type, pooler.normalize, pooler.matryoshka_dimensions) == ("MEAN", False, (8, 32))
    [output] = llm.embed(PROMPTS[1], use_tqdm=False)
    assert_matches(output, hf_pooled(hf_base, output.prompt_token_ids, "MEAN", normalize=False))
    assert len(llm.embed(PROMPTS[1], PoolingParams(dimensions=8), use_tqdm=False)[0].outputs.embedding) == 8
    with pytest.raises(ValueError, match="Matryoshka"):
        llm.embed(PROMPTS[1], PoolingParams(dimensions=16), use_tqdm=False)
