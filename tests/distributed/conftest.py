"""Prompts and engine settings shared by the parallelism tests (float32 on CPU; gloo between the rank processes);
the tiny models come from the session-wide ``tiny_model_dir`` fixture (tests/conftest.py)."""

from __future__ import annotations

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
ENGINE_KWARGS = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
                     num_gpu_blocks_override=32)


def greedy_tokens(model_dir: str, max_tokens: int = 8, **kwargs) -> list[list[int]]:
    """Greedy generations of PROMPTS (in one batch) by an engine built with ``kwargs``."""
    from pagedllm import LLM, SamplingParams

    llm = LLM(model_dir, **ENGINE_KWARGS, **kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
