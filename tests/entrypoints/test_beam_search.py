"""LLM.beam_search equals HF transformers' num_beams beam search (float32, CPU) for the same length penalty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, BeamSearchParams
from tests.utils import build_tiny_model, load_hf_model

PROMPTS = [[5, 17, 42, 99, 7, 3], [125, 11, 64, 120], [33, 18, 77, 9, 101, 102, 103]]
KWARGS = dict(device="cpu", block_size=4, num_gpu_blocks_override=256, max_model_len=64, max_num_seqs=64)


@torch.no_grad()
def hf_beams(model_dir: str, prompt: list[int], width: int, max_tokens: int, length_penalty: float, eos: int | None):
    model = load_hf_model(model_dir)
    out = model.generate(
        torch.tensor([prompt]), num_beams=width, num_return_sequences=width, max_new_tokens=max_tokens,
        do_sample=False, length_penalty=length_penalty, early_stopping=False, eos_token_id=eos, pad_token_id=0,
        output_scores=True, return_dict_in_generate=True,
    )
    results = []
    for sequence, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        generated = sequence[len(prompt):]
        if eos is not None and eos in generated:
            generated = generated[: generated.index(eos) + 1]  # HF pads after eos
        results.append((generated, score))
    return results


def set_eos(model_dir: str, eos: int) -> None:
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if path.exists():
            config = json.loads(path.read_text())
            config["eos_token_id"] = eos
            path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def model_with_frequent_eos(tmp_path_factory) -> tuple[str, int]:
    """A tiny model whose eos is a token its beams like, so hypotheses really finish early."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("beam"), "llama")
    beams = hf_beams(model_dir, PROMPTS[0], 4, 8, 1.0, eos=None)
    eos = beams[0][0][1]  # the second token of the best beam: some hypotheses end there
    set_eos(model_dir, eos)
    return model_dir, eos


def assert_same(ours, theirs):
    assert [s.token_ids for s in ours.sequences] == [tokens for tokens, _ in theirs]
    for sequence, (_, score) in zip(ours.sequences, theirs):
        assert sequence.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_with_eos_matches_hf(model_with_frequent_eos, length_penalty):
    model_dir, eos = model_with_frequent_eos
    llm = LLM(model_dir, skip_tokenizer_init=True, **KWARGS)
    params = BeamSearchParams(beam_width=4, max_tokens=8, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    finished_early = False
    for prompt, output in zip(PROMPTS, outputs):
        theirs = hf_beams(model_dir, prompt, 4, 8, length_penalty, eos)
        assert_same(output, theirs)
        finished_early |= any(s.finish_reason == "stop" for s in output.sequences)
    # A strong length penalty favours long hypotheses: the short eos-ended ones drop out of the final set.
    assert finished_early or length_penalty > 1, "the test meant some hypotheses to end with eos"
    engine = llm.llm_engine.engine_core
    assert engine.scheduler.kv_cache_manager.num_free_blocks == engine.num_blocks


def test_beam_search_ignoring_eos_matches_hf_without_eos(model_with_frequent_eos):
    model_dir, _ = model_with_frequent_eos
    llm = LLM(model_dir, skip_tokenizer_init=True, **KWARGS)
    output = llm.beam_search({"prompt_token_ids": PROMPTS[2]}, BeamSearchParams(3, 6, ignore_eos=True))[0]
    assert_same(output, hf_beams(model_dir, PROMPTS[2], 3, 6, 1.0, eos=None))
    assert all(len(s.token_ids) == 6 and s.finish_reason == "length" for s in output.sequences)


def test_beam_search_validates():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)
