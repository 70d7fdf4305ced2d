"""Fused MoE microbenchmark on one Qwen3-30B-A3B layer's experts (128 experts, top-8, hidden 2048, expert
intermediate 768, bf16; run on a GPU), per token count:

- ``grouped``: the grouped GEMM over pairs sorted by expert (``fused_moe.py``, SiLU-and-mul in the first GEMM's
  epilogue), routing (``select_experts``) and the sort included: the path of steps past the decode limit;
- ``grouped_separate_silu``: the same with the separate SiLU-and-mul kernel (up to 64 tokens);
- ``decode``: the per-pair GEMVs with the routing inside (``decode_moe.py``), at the counts up to
  ``--decode-max-tokens`` (the model takes it up to ``decode_moe.MAX_PAIRS`` pairs: 8 tokens at top-8);
- ``torch_eager``: the reference loop (it syncs per expert).

Fused times are per call from a CUDA graph of ``--calls`` calls over rotating weight copies (more bytes than L2
holds, as in a decode step), from the router logits to the layer's output. GB/s counts the bytes of the distinct
experts the step hits (what the batch-1 roofline counts: 8 x 9.4 MB per layer). ``--sweep-tokens`` also times the
decode path's launch shapes (``SWEEP``) at those counts. Prints one line per case and writes --output-json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from cuda_graph_timing import time_calls  # this folder is on sys.path when a script runs

from pagedllm.model.moe import decode_moe
from pagedllm.model.moe.fused_moe import fused_moe
from pagedllm.model.moe.router import select_experts
from pagedllm.model.moe.torch_moe import torch_moe

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 128, 8, 2048, 768
TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024]
NUM_COPIES = 4
SEPARATE_SILU_MAX_TOKENS = 64  # the separate SiLU kernel's variant lost everywhere it was measured; kept for small steps
Config = decode_moe.DecodeConfig
# Column blocks, K step, warps and pipeline depth around the default (16, 32) / (32, 64) at 1 / 4 tokens.
SWEEP = [Config(8, 16), Config(16, 32), Config(32, 64), Config(16, 64), Config(16, 32, 256, num_stages=3),
         Config(8, 16, 256, num_stages=3), Config(8, 16, 512, num_stages=2), Config(16, 32, num_stages=6),
         Config(16, 32, 64, num_stages=6), Config(16, 32, num_warps=8), Config(32, 64, num_stages=6)]


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e6)
    return best


def distinct_expert_bytes(topk_ids: torch.Tensor) -> int:
    per_expert = 3 * HIDDEN * INTERMEDIATE * 2
    return int(torch.unique(topk_ids).numel()) * per_expert


@dataclasses.dataclass
class Case:
    """One token count's input, router logits and rotating weight copies."""

    x: torch.Tensor
    logits: torch.Tensor
    weights: list[tuple[torch.Tensor, torch.Tensor]]

    def grouped(self, i: int, fuse_silu_mul: bool = True) -> torch.Tensor:
        w13, w2 = self.weights[i % NUM_COPIES]
        routing = select_experts(self.logits, TOP_K, True, torch.bfloat16)
        return fused_moe(self.x, w13, w2, *routing, fuse_silu_mul=fuse_silu_mul)

    def decode(self, i: int, config: decode_moe.DecodeConfig | None = None) -> torch.Tensor:
        w13, w2 = self.weights[i % NUM_COPIES]
        return decode_moe.fused_moe_decode(self.x, w13, w2, self.logits, TOP_K, True, True, config)

    def reference(self) -> torch.Tensor:
        w13, w2 = self.weights[0]
        return torch_moe(self.x, w13, w2, *select_experts(self.logits, TOP_K, True, torch.bfloat16))


def make_weights() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02,
             torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) * 0.02)
            for _ in range(NUM_COPIES)]


def make_case(num_tokens: int, weights) -> Case:
    """Router logits as bfloat16 as the model's, without ties (a shuffled grid: on a tie at the k-th place both
    paths are right and may still pick differently, which max_abs_diff would report)."""
    x = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    order = torch.stack([torch.randperm(EXPERTS) for _ in range(num_tokens)])
    return Case(x, (order * (3.0 / EXPERTS)).to("cuda", torch.bfloat16), weights)


def bench(case: Case, calls: int, decode_max_tokens: int) -> dict:
    num_tokens = case.x.shape[0]
    expert_bytes = distinct_expert_bytes(select_experts(case.logits, TOP_K, True)[1])
    row = {"tokens": num_tokens, "expert_bytes": expert_bytes, "grouped_us": time_calls(case.grouped, calls)}
    if num_tokens <= SEPARATE_SILU_MAX_TOKENS:
        row["grouped_separate_silu_us"] = time_calls(lambda i: case.grouped(i, fuse_silu_mul=False), calls)
    expected = case.reference().float()
    row["torch_eager_us"] = _best_of(case.reference, 3)
    row["grouped_max_abs_diff"] = float((case.grouped(0).float() - expected).abs().max())
    row["grouped_GBps"] = expert_bytes / row["grouped_us"] / 1e3
    if num_tokens <= decode_max_tokens:
        row["decode_us"] = time_calls(case.decode, calls)
        row["decode_max_abs_diff"] = float((case.decode(0).float() - expected).abs().max())
        row["decode_GBps"] = expert_bytes / row["decode_us"] / 1e3
        row["decode_speedup"] = row["grouped_us"] / row["decode_us"]
    return row


def sweep(case: Case, calls: int) -> list[dict]:
    """The decode path's time under each launch shape of ``SWEEP`` (the default one first)."""
    expert_bytes = distinct_expert_bytes(select_experts(case.logits, TOP_K, True)[1])
    rows = []
    for config in [None, *SWEEP]:
        us = time_calls(lambda i, config=config: case.decode(i, config), calls)
        rows.append({"tokens": case.x.shape[0], "config": dataclasses.asdict(config) if config else "default",
                     "decode_us": us, "decode_GBps": expert_bytes / us / 1e3})
    return rows


def rounded(row: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--decode-max-tokens", type=int, default=8)
    parser.add_argument("--sweep-tokens", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--output-json")
    args = parser.parse_args()
    weights = make_weights()
    rows, sweep_rows = [], []
    for num_tokens in args.tokens:
        rows.append(bench(make_case(num_tokens, weights), args.calls, args.decode_max_tokens))
        print(json.dumps(rounded(rows[-1])), flush=True)
    for num_tokens in args.sweep_tokens:
        for row in sweep(make_case(num_tokens, weights), args.calls):
            sweep_rows.append(row)
            print(json.dumps(rounded(row)), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "shape": [EXPERTS, TOP_K, HIDDEN, INTERMEDIATE],
                       "decode_max_pairs": decode_moe.MAX_PAIRS, "rows": rows, "decode_sweep": sweep_rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
