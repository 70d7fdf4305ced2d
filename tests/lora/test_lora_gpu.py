"""Multi-LoRA on a CUDA device (skipped without one): the Triton kernels inside the decode and mixed CUDA graphs give
the tokens of the CPU torch path (the oracle) for a float32 batch mixing the base model and 4 adapters with 2 slots
(hidden sizes 64, and 256, where the shrink splits K and sums the slices in the launch);
a bf16 run of 12 adapters over 4 slots finishes every request and leaks no block."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.bench.lora import random_adapters
from pagedllm.config import ModelConfig
from tests.utils import build_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[5 + i, 17, 42, 99, 7, 3, 250, 11, 64][: 3 + i % 7] * (1 + i % 3) for i in range(15)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("hidden_size", [64, 256])  # 256: the shrink splits K (at least 128 columns a slice)
def test_cuda_graphs_with_lora_kernels_match_the_cpu_path(tmp_path, arch, hidden_size):
    model_dir = build_tiny_model(tmp_path, arch, vocab_size=320,  # the prompts hold ids up to 250
                                 hidden_size=hidden_size, intermediate_size=3 * hidden_size // 2)
    adapters = random_adapters(ModelConfig.from_pretrained(model_dir, None), 4, 8, root=str(tmp_path / "loras"),
                               scale=0.3)
    loras = [None, *adapters] * 3

    def run(device: str) -> list[list[int]]:
        llm = LLM(model_dir, device=device, dtype="float32", num_gpu_blocks_override=128, block_size=4,
                  max_num_batched_tokens=32, max_num_seqs=8, max_model_len=128, enable_lora=True, max_loras=2,
                  max_lora_rank=8, skip_tokenizer_init=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False,
                               lora_request=loras)
        if device == "cuda":
            assert llm.llm_engine.engine_core.model_runner.use_cuda_graphs
        return [o.outputs[0].token_ids for o in outputs]

    cuda, cpu = run("cuda"), run("cpu")
    assert cuda == cpu
    assert len({tuple(t) for t in cpu[:5]}) == 5  # base and four adapters differ


def test_bf16_with_many_adapters_and_swapping(tmp_path):
    model_dir = build_tiny_model(tmp_path, "qwen3")
    adapters = random_adapters(ModelConfig.from_pretrained(model_dir, None), 12, 16, root=str(tmp_path / "loras"),
                               scale=0.3)
    llm = LLM(model_dir, device="cuda", dtype="bfloat16", num_gpu_blocks_override=256, block_size=16,
              max_model_len=128, enable_lora=True, max_loras=4, max_cpu_loras=6, skip_tokenizer_init=True)
    prompts = [{"prompt_token_ids": [3 + i % 50, 9, 27, 81]} for i in range(48)]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=[adapters[i % 12] for i in range(48)])
    assert all(len(o.outputs[0].token_ids) == 24 for o in outputs)
    engine = llm.llm_engine.engine_core
    assert engine.model_runner.lora.num_slot_loads >= 12
    assert engine.scheduler.kv_cache_manager.num_free_blocks == engine.num_blocks
