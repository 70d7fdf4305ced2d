"""Fused MoE microbenchmark on one Qwen3-30B-A3B layer's experts (128 experts, top-8, hidden 2048, expert
intermediate 768, bf16; run on a GPU): the fused path with SiLU-and-mul in the first GEMM's epilogue, the same with
the separate SiLU-and-mul kernel, and the torch reference loop (eager: it syncs per expert), per token count.

Fused times are per call from a CUDA graph of ``--calls`` calls over rotating weight copies (more bytes than L2
holds, as in a decode step), routing included; GB/s counts the bytes of the distinct experts the step hits
(what the batch-1 roofline counts: 8 x 9.4 MB per layer). Prints one line per case and writes --output-json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pagedllm.model.moe.fused_moe import fused_moe
from pagedllm.model.moe.router import select_experts
from pagedllm.model.moe.torch_moe import torch_moe

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 128, 8, 2048, 768
TOKENS = [1, 4, 16, 64, 256, 1024]
NUM_COPIES = 4


def time_graph(fn, num_calls: int) -> float:
    """Microseconds per call of ``fn(i)`` replayed from one CUDA graph of ``num_calls`` calls (best of 5)."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(num_calls):
            fn(i)
    return _best_of(graph.replay, 5) / num_calls


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


def bench(num_tokens: int, calls: int) -> dict:
    weights = [(torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02,
                torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) * 0.02)
               for _ in range(NUM_COPIES)]
    x = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(num_tokens, EXPERTS, device="cuda")
    topk_weights, topk_ids = select_experts(logits, TOP_K, True, torch.bfloat16)
    row = {"tokens": num_tokens, "expert_bytes": distinct_expert_bytes(topk_ids)}
    for name, fuse in (("fused", True), ("fused_separate_silu", False)):
        def call(i, fuse=fuse):
            w13, w2 = weights[i % NUM_COPIES]
            fused_moe(x, w13, w2, *select_experts(logits, TOP_K, True, torch.bfloat16), fuse_silu_mul=fuse)
        row[f"{name}_us"] = time_graph(call, calls)
    w13, w2 = weights[0]
    row["torch_eager_us"] = _best_of(lambda: torch_moe(x, w13, w2, topk_weights, topk_ids), 3)
    expected = torch_moe(x, w13, w2, topk_weights, topk_ids).float()
    row["max_abs_diff"] = float((fused_moe(x, w13, w2, topk_weights, topk_ids).float() - expected).abs().max())
    row["fused_GBps"] = row["expert_bytes"] / row["fused_us"] / 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    rows = []
    for num_tokens in args.tokens:
        row = bench(num_tokens, args.calls)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "shape": [EXPERTS, TOP_K, HIDDEN, INTERMEDIATE],
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
