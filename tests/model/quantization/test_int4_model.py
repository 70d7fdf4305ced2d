"""Whole tiny models in each 4-bit format (GPTQ v1 with act-order, GPTQ v2 symmetric, AWQ, compressed-tensors
asymmetric with act-order and symmetric by channel) load from disk through ``LLM`` and generate greedily the same
tokens as HF transformers running on the dequantized dense weights; ``load_format="dummy"`` runs GPTQ and AWQ
from a config alone. All float32 on CPU (the torch dequantize path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.model.quantization.int4_checkpoints import Scheme, write_quantized_model
from tests.utils import build_tiny_model, load_hf_model

ENGINE = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, block_size=4, max_model_len=64, seed=0)
PROMPTS = [[1, 17, 33, 90, 5], [1, 64, 2, 7, 100, 45, 8]]
NUM_TOKENS = 8
# hidden 128 / intermediate 256: every projection's K is a multiple of the group sizes used.
SIZES = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("int4_dense")
    return {arch: build_tiny_model(root, arch, **SIZES) for arch in ("llama", "qwen3")}


def hf_greedy(dense_dir: str, dense_weights: dict[str, torch.Tensor]) -> list[list[int]]:
    model = load_hf_model(dense_dir)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, weight in dense_weights.items():
            params[name].copy_(weight)
        outputs = []
        for prompt in PROMPTS:  # a plain argmax loop: EOS is just a token here, as with ignore_eos
            ids = list(prompt)
            for _ in range(NUM_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outputs.append(ids[len(prompt):])
    return outputs


def pagedllm_greedy(model_dir: str, **kwargs) -> list[list[int]]:
    llm = LLM(model_dir, **ENGINE, **kwargs)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize(
    ("arch", "scheme"),
    [("llama", Scheme("gptq", group_size=32, sym=False, act_order=True)),
     ("qwen3", Scheme("gptq_v2", group_size=64, sym=True)),
     ("qwen3", Scheme("awq", group_size=32)),
     ("llama", Scheme("ct", group_size=64, sym=False, act_order=True)),
     ("qwen3", Scheme("ct", group_size=-1, sym=True))],
    ids=["llama-gptq-actorder", "qwen3-gptq_v2-sym", "qwen3-awq", "llama-ct-actorder", "qwen3-ct-channel"],
)
def test_greedy_matches_hf_on_dequantized_weights(dense_dirs, tmp_path: Path, arch: str, scheme: Scheme) -> None:
    if scheme.fmt == "ct":
        pytest.importorskip("pagedllm.model.quantization.compressed_tensors",
                            reason="the compressed-tensors config parser is another module")
        pytest.importorskip("compressed_tensors")
    model_dir = tmp_path / "quantized"
    dense = write_quantized_model(dense_dirs[arch], model_dir, scheme)
    assert pagedllm_greedy(str(model_dir)) == hf_greedy(dense_dirs[arch], dense)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_dummy_weights_from_a_config(dense_dirs, method: str) -> None:
    outputs = pagedllm_greedy(dense_dirs["qwen3"], load_format="dummy", quantization=method)
    assert all(len(tokens) == NUM_TOKENS for tokens in outputs)


def test_quantization_without_a_checkpoint_config_is_an_error(dense_dirs) -> None:
    with pytest.raises(ValueError, match="needs a checkpoint quantized with it"):
        LLM(dense_dirs["qwen3"], **ENGINE, quantization="gptq")
