"""Time xgrammar's bitmask fills for the bench schema, as xgrammar compiles it and with its counted repetitions
rewritten as chains of rules (``pagedllm.structured_output.bounded_repeats``): compile seconds and per-fill
milliseconds along the same random walks (each token drawn among the allowed ones). Prints one JSON object.

    python benchmarks/scripts/grammar_fill_times.py --tokenizer .assets/tokenizers/qwen3 [--output-json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import numpy as np
import xgrammar as xgr
from transformers import AutoTokenizer

from pagedllm.bench.structured import BENCH_SCHEMA
from pagedllm.structured_output.xgrammar_backend import with_fast_repeats


def fill_times(compiled: xgr.CompiledGrammar, vocab_size: int, num_walks: int, seed: int) -> np.ndarray:
    rng, bitmask, times = random.Random(seed), xgr.allocate_token_bitmask(1, vocab_size), []
    for _ in range(num_walks):
        matcher = xgr.GrammarMatcher(compiled)
        while not matcher.is_terminated():
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - start)
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size]
            assert matcher.accept_token(int(rng.choice(np.flatnonzero(bits))))
    return np.array(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--num-walks", type=int, default=20)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))
    grammar = xgr.Grammar.from_json_schema(json.dumps(BENCH_SCHEMA), any_whitespace=False)
    record = {"tokenizer": args.tokenizer, "vocab_size": len(tokenizer), "num_walks": args.num_walks,
              "machine": platform.processor() or platform.machine()}
    for name, variant in [("counted_repetitions", grammar), ("chains", with_fast_repeats(grammar))]:
        start = time.perf_counter()
        compiled = compiler.compile_grammar(variant)
        compile_s = time.perf_counter() - start
        ms = fill_times(compiled, len(tokenizer), args.num_walks, seed=0)
        record[name] = {"compile_s": round(compile_s, 3), "fills": len(ms), "total_ms": round(ms.sum(), 1),
                        **{f"{stat}_ms": round(float(value), 4) for stat, value in
                           [("mean", ms.mean()), ("p50", np.median(ms)), ("p99", np.percentile(ms, 99)),
                            ("max", ms.max())]}}
    print(json.dumps(record, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump(record, file, indent=2)


if __name__ == "__main__":
    main()
