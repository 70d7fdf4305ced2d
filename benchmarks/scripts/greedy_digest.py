"""Tokens of a fixed greedy and a fixed seeded generation, as one digest each: run on two trees in one device call,
equal digests mean token-for-token identical outputs (bf16 Qwen3-0.6B architecture, dummy weights).

    python benchmarks/scripts/greedy_digest.py --model qwen3-0.6b

The prompts (lengths 3..200, several per step) make decode steps and mixed prefill/decode steps of many sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random

from pagedllm import LLM, SamplingParams
from pagedllm.bench.models import resolve_model


def digest(outputs) -> str:
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    args = parser.parse_args()
    llm = LLM(resolve_model(args.model), load_format="dummy", skip_tokenizer_init=True, max_model_len=2048)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(n)]} for n in (3, 17, 40, 5, 200, 64, 9, 1)]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    seeded = llm.generate(prompts, SamplingParams(temperature=1.0, seed=3, max_tokens=48, ignore_eos=True),
                          use_tqdm=False)
    single = llm.generate(prompts[1], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    print(json.dumps({"greedy": digest(greedy), "seeded": digest(seeded), "single_greedy": digest(single)}))


if __name__ == "__main__":
    main()
