"""Top-1 agreement of an FP8 KV cache with the float KV cache, teacher-forced over long greedy generations (issue 16).

    python benchmarks/scripts/kv_cache_fp8_accuracy.py --model ../shared/assets/models/stories260K \
        --output-json benchmarks/cpu/kv-cache-fp8/accuracy-stories260k.json
    python benchmarks/scripts/kv_cache_fp8_accuracy.py --output-json benchmarks/cpu/kv-cache-fp8/accuracy-smollm2.json

The float-cache engine generates a few hundred tokens greedily from each prompt; then every engine (the float
cache, and each FP8 cache variant) reads the same token sequences as prompts with ``prompt_logprobs=1``, and at
each position its top-1 token is compared with the float cache's. Teacher forcing keeps one early disagreement
from changing everything after it: the figure counts how often the cache's rounding changes the model's choice.
The model runs in float32 on CPU (the model's dtype there), so the float cache is float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints.default_model import model_or_default

PROMPTS = [
    "Once upon a time, there was a little girl named",
    "The old man walked to the river and",
    "Tom and his dog went to the park. They",
    "Explain why the sky is blue in simple words.",
    "Write a short story about a robot who learns to paint.",
    "List three tips for staying healthy:",
    "In the morning, the sun was shining and the birds",
    "What is the capital of France, and what is it famous for?",
]
# name -> LLM keyword arguments of each cache compared with the float one
VARIANTS = {
    "fp8_e4m3, calculate_kv_scales": dict(kv_cache_dtype="fp8", calculate_kv_scales=True),
    "fp8_e4m3, scales 1.0": dict(kv_cache_dtype="fp8"),
    "fp8_e5m2, scales 1.0": dict(kv_cache_dtype="fp8_e5m2"),
}


def generate_sequences(llm: LLM, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outputs]


def teacher_forced_top1(llm: LLM, sequences: list[list[int]]) -> list[list[int]]:
    """The engine's top-1 token at each position of each sequence (for the token after it), the sequence being the
    context."""
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences],
                           SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    return [[next(t for t, lp in entry.items() if lp.rank == 1) for entry in out.prompt_logprobs[1:]]
            for out in outputs]


def agreement(reference: list[list[int]], other: list[list[int]], first_positions: list[int]) -> dict:
    """Agreement over all positions and over the generated ones (after each prompt)."""
    pairs = [(a, b) for r, o in zip(reference, other) for a, b in zip(r, o)]
    generated = [(a, b) for r, o, first in zip(reference, other, first_positions) for a, b in zip(r[first:], o[first:])]
    return {"top1_agreement": round(sum(a == b for a, b in pairs) / len(pairs), 5), "positions": len(pairs),
            "top1_agreement_generated": round(sum(a == b for a, b in generated) / len(generated), 5),
            "generated_positions": len(generated)}


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=320, help="generated tokens per prompt (default: 320)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    model = model_or_default(args.model)
    common = dict(max_model_len=512, enable_prefix_caching=False, seed=0)
    start = time.perf_counter()
    reference_llm = LLM(model, **common)
    sequences = generate_sequences(reference_llm, args.max_tokens)
    prompt_lens = [len(o.prompt_token_ids) for o in reference_llm.generate(PROMPTS, SamplingParams(max_tokens=1),
                                                                            use_tqdm=False)]
    reference = teacher_forced_top1(reference_llm, sequences)
    first_generated = [n - 1 for n in prompt_lens]  # position i predicts token i + 1: the first generated is n - 1
    record = {"model": str(args.model or "SmolLM2-135M-Instruct (default)"),
              "dtype": reference_llm.llm_engine.config.model_config.dtype,
              "reference_cache": reference_llm.llm_engine.config.kv_cache_dtype,
              "prompts": len(PROMPTS), "max_tokens": args.max_tokens, "variants": {}}
    self_check = agreement(reference, teacher_forced_top1(reference_llm, sequences), first_generated)
    record["reference_vs_itself"] = self_check["top1_agreement"]  # 1.0 unless the engine is not deterministic
    del reference_llm
    for name, kwargs in VARIANTS.items():
        llm = LLM(model, **common, **kwargs)
        result = agreement(reference, teacher_forced_top1(llm, sequences), first_generated)
        result["kv_cache_dtype"] = llm.llm_engine.config.kv_cache_dtype
        record["variants"][name] = result
        print(f"{name}: top-1 agreement {result['top1_agreement']:.4f} over {result['positions']} positions "
              f"({result['top1_agreement_generated']:.4f} over the {result['generated_positions']} generated)",
              flush=True)
        del llm
    record.update(command=" ".join([Path(sys.executable).name, *sys.argv]), commit=git_commit(),
                  machine=f"{platform.machine()} CPU, {platform.system()}", seconds=round(time.perf_counter() - start))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
