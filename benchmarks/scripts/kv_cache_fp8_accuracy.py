"""Top-1 agreement of an FP8 KV cache with float KV caches, teacher-forced over long greedy generations (issue 16).

    python benchmarks/scripts/kv_cache_fp8_accuracy.py --model ../shared/assets/models/stories260K \
        --output-json benchmarks/cpu/kv-cache-fp8/accuracy-stories260k.json
    python benchmarks/scripts/kv_cache_fp8_accuracy.py --output-json benchmarks/cpu/kv-cache-fp8/accuracy-smollm2.json

The model runs in float32 on CPU. With a float32 KV cache it generates a few hundred tokens greedily from each
prompt; then every engine (float32 cache, bf16 cache, each FP8 variant) reads those token sequences as prompts with
``prompt_logprobs=2``, and its top-1 token at each position is compared with the float32 cache's and the bf16
cache's. Teacher forcing keeps one early disagreement from changing everything after it: the figure counts how
often the cache's rounding changes the model's choice. Agreement is also given where the float32 cache's top-1
leads its top-2 by at least ``MARGIN`` nats (positions that are not near-ties).
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
# name -> LLM keyword arguments of each cache compared with the float32 one
VARIANTS = {
    "bfloat16": dict(kv_cache_dtype="bfloat16"),
    "fp8_e4m3, calculate_kv_scales": dict(kv_cache_dtype="fp8", calculate_kv_scales=True),
    "fp8_e4m3, scales 1.0": dict(kv_cache_dtype="fp8"),
    "fp8_e5m2, scales 1.0": dict(kv_cache_dtype="fp8_e5m2"),
}
MARGIN = 0.5  # nats
ENGINE_KWARGS = dict(max_model_len=512, enable_prefix_caching=False, seed=0)  # every engine compared


def generate_sequences(llm: LLM, max_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Prompt + greedy output of each prompt, and each prompt's length."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return ([list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outputs],
            [len(o.prompt_token_ids) for o in outputs])


def teacher_forced(llm: LLM, sequences: list[list[int]]) -> list[list[tuple[int, float]]]:
    """At each position of each sequence (the sequence being the context): the engine's top-1 token for the next
    position, and by how many nats it leads the top-2."""
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences],
                           SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    rows = []
    for out in outputs:
        row = []
        for entry in out.prompt_logprobs[1:]:
            ranked = sorted((lp.rank, token, lp.logprob) for token, lp in entry.items() if lp.rank in (1, 2))
            row.append((ranked[0][1], ranked[0][2] - ranked[1][2]))
        rows.append(row)
    return rows


def agreement(reference: list[list[tuple[int, float]]], other: list[list[tuple[int, float]]],
              first_generated: list[int]) -> dict:
    """Top-1 agreement over all positions, over the generated ones, and over those where the reference's top-1
    leads by MARGIN nats or more."""
    pairs = [(r, o, i >= first) for r_row, o_row, first in zip(reference, other, first_generated)
             for i, (r, o) in enumerate(zip(r_row, o_row))]

    def rate(selected):
        return round(sum(r[0] == o[0] for r, o, _ in selected) / len(selected), 5) if selected else None

    clear = [p for p in pairs if p[0][1] >= MARGIN]
    return {"top1_agreement": rate(pairs), "positions": len(pairs),
            "top1_agreement_generated": rate([p for p in pairs if p[2]]),
            f"top1_agreement_margin_ge_{MARGIN}": rate(clear), f"positions_margin_ge_{MARGIN}": len(clear)}


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def write_record(record: dict, start: float, output_json: str | None) -> None:
    """Add the command, commit, machine and duration to the record; write it (when asked) and print it."""
    record.update(command=" ".join([Path(sys.executable).name, *sys.argv]), commit=git_commit(),
                  machine=f"{platform.machine()} CPU, {platform.system()}", seconds=round(time.perf_counter() - start))
    if output_json:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=320, help="generated tokens per prompt (default: 320)")
    parser.add_argument("--output-json", default=None)
    return parser.parse_args()


def reference_run(model: str, max_tokens: int) -> tuple[LLM, list[list[int]], list[int], list]:
    """The float32-cache engine, the sequences it generates from PROMPTS, where each one's generated part starts
    and its teacher-forced top-1s over them (the reference)."""
    llm = LLM(model, **ENGINE_KWARGS)
    sequences, prompt_lens = generate_sequences(llm, max_tokens)
    first_generated = [n - 1 for n in prompt_lens]  # position i predicts token i + 1: the first generated is n - 1
    return llm, sequences, first_generated, teacher_forced(llm, sequences)


def main() -> None:
    args = parse_args(__doc__)
    model = model_or_default(args.model)
    start = time.perf_counter()
    reference_llm, sequences, first_generated, reference = reference_run(model, args.max_tokens)
    record = {"model": str(args.model or "SmolLM2-135M-Instruct (default)"),
              "dtype": reference_llm.llm_engine.config.model_config.dtype,
              "reference_cache": reference_llm.llm_engine.config.kv_cache_dtype,
              "prompts": len(PROMPTS), "max_tokens": args.max_tokens,
              "reference_vs_itself": agreement(reference, teacher_forced(reference_llm, sequences),
                                               first_generated)["top1_agreement"],  # 1.0: deterministic
              "variants": {}}
    del reference_llm
    choices = {}
    for name, kwargs in VARIANTS.items():
        llm = LLM(model, **ENGINE_KWARGS, **kwargs)
        choices[name] = teacher_forced(llm, sequences)
        result = {"kv_cache_dtype": llm.llm_engine.config.kv_cache_dtype,
                  "vs_float32_cache": agreement(reference, choices[name], first_generated)}
        if name != "bfloat16":
            result["vs_bfloat16_cache"] = agreement(choices["bfloat16"], choices[name], first_generated)
        record["variants"][name] = result
        print(f"{name}: top-1 agreement with the float32 cache {result['vs_float32_cache']['top1_agreement']:.4f}"
              + (f", with the bf16 cache {result['vs_bfloat16_cache']['top1_agreement']:.4f}"
                 if "vs_bfloat16_cache" in result else ""), flush=True)
        del llm
    write_record(record, start, args.output_json)


if __name__ == "__main__":
    main()
