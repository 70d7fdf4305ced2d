"""W4A16 GEMM microbenchmark on Llama-3.1-8B's projection shapes (run on a GPU): the Triton W4A16 kernel, its
dequantize + cuBLAS path, and bf16 (cuBLAS F.linear, and pagedllm's gemm.linear: the skinny kernel at <= 16 rows),
for rows M = 1 .. 4096; achieved GB/s of the int4 kernel at M = 1; a small sweep of decode launch shapes.

Times are per call, from CUDA graphs of ``--calls`` calls over rotating weight copies (more bytes than L2 holds),
so launch overhead is out and the weight comes from HBM as in a decode step. ``--output-json`` keeps the table.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from cuda_graph_timing import time_calls  # this folder is on sys.path when a script runs

from pagedllm.model import gemm
from pagedllm.model.quantization.int4 import Int4Checkpoint, to_canonical
from pagedllm.model.w4a16_kernel import W4A16Config, choose_config, dequantize_int4, w4a16_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [1, 4, 16, 64, 128, 256, 1024]
NUM_COPIES = 4


def random_weights(n: int, k: int, group_size: int = 128):
    out = []
    for seed in range(NUM_COPIES):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.int32)
        scales = torch.rand(n, k // group_size, device="cuda", generator=gen) * 0.01
        zeros = torch.randint(0, 16, (n, k // group_size), device="cuda", generator=gen)
        out.append(to_canonical(Int4Checkpoint(q, scales, zeros, None, group_size), torch.float16, "bench"))
    return out


def int4_bytes(weight) -> int:
    return sum(t.numel() * t.element_size() for t in (weight.qweight, weight.scales, weight.zeros))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    records = []
    print(f"{'shape':8} {'M':>5} {'bf16 cuBLAS':>11} {'bf16 pagedllm':>13} {'w4a16 kern':>10} {'deq+cuBLAS':>10} "
          f"{'kern GB/s':>9}  config")
    for name, (n, k) in SHAPES.items():
        weights = random_weights(n, k)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2)]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_cublas = time_calls(lambda i: F.linear(x, dense[i % 2]), args.calls)
            t_ours = time_calls(lambda i: gemm.linear(x, dense[i % 2]), args.calls)
            t_kernel = (time_calls(lambda i: w4a16_linear(x, weights[i % NUM_COPIES], dequant_min_rows=1 << 30),
                                   args.calls) if m <= 1024 else float("nan"))
            t_deq = time_calls(lambda i: F.linear(x, dequantize_int4(weights[i % NUM_COPIES], x.dtype)),
                               max(4, args.calls // 4))
            gbps = int4_bytes(weights[0]) / t_kernel / 1e3
            config = choose_config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            print(f"{name:8} {m:5d} {t_cublas:11.1f} {t_ours:13.1f} {t_kernel:10.1f} {t_deq:10.1f} {gbps:9.0f}  "
                  f"{config}")
            records.append(dict(shape=name, n=n, k=k, rows=m, bf16_cublas_us=t_cublas, bf16_pagedllm_us=t_ours,
                                w4a16_kernel_us=t_kernel, dequant_cublas_us=t_deq, kernel_gbps=gbps))
        if args.sweep:
            records += sweep(name, n, k, weights, args.calls)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "records": records}, f, indent=1)


def sweep(name: str, n: int, k: int, weights, num_calls: int) -> list[dict]:
    out = []
    for m in (1,):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        block_m = max(16, m)
        for block_n, stages, warps in ((64, 4, 4), (64, 6, 4), (128, 4, 4), (32, 4, 4), (128, 3, 8)):
            for split in (1, 2, 4, 8):
                config = W4A16Config(block_n, block_m, split, warps, stages)
                try:
                    t = time_calls(lambda i: w4a16_linear(x, weights[i % NUM_COPIES], config=config), num_calls)
                except Exception as exc:  # noqa: BLE001 - out of shared memory etc.: skip the shape
                    print(f"  sweep {name} M={m} {config}: {type(exc).__name__}")
                    continue
                out.append(dict(shape=name, rows=m, sweep=True, block_n=block_n, stages=stages,
                                warps=warps, split_k=split, us=t))
        best = sorted((r for r in out if r["shape"] == name and r["rows"] == m), key=lambda r: r["us"])[:3]
        for r in best:
            print(f"  sweep {name} M={m}: {r['us']:.1f} us  bn={r['block_n']} "
                  f"st={r['stages']} w={r['warps']} split={r['split_k']}")
    return out


if __name__ == "__main__":
    main()
