"""W4A16 GEMM microbenchmark on Llama-3.1-8B's projection shapes (run on a GPU), per projection and row count M:
bf16 (cuBLAS ``F.linear``, and pagedllm's ``gemm.linear``: the skinny kernel up to 16 rows), the W4A16 GEMV kernel
(no tl.dot; M <= 8, forced past ``GEMV_MAX_ROWS``), the tl.dot W4A16 kernel (forced below ``DEQUANT_MIN_ROWS``
too) and dequantize + cuBLAS; each W4A16 kernel also as GB/s of int4 weight + scales + zeros streamed.

Times are per call, from CUDA graphs of ``--calls`` calls over rotating weight copies (more bytes than L2 holds),
so launch overhead is out and the weight comes from HBM as in a decode step. ``--sweep`` adds a sweep of the GEMV
kernel's launch shapes (row block, warps, pipeline depth, K split) at M = 1 and 4, printing the best per shape
against ``choose_config``'s. ``--output-json`` keeps every number.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from cuda_graph_timing import time_calls  # this folder is on sys.path when a script runs

from pagedllm.model import gemm
from pagedllm.model.quantization.int4 import TILE_K, Int4Checkpoint, to_canonical
from pagedllm.model.split_k import even_split
from pagedllm.model.w4a16_kernel import GEMV_MAX_ROWS, W4A16Config, choose_config, dequantize_int4, w4a16_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [1, 2, 4, 8, 16, 64]
GEMV_ROWS_MAX_TIMED = 8  # the GEMV kernel's registers grow with the rows: past this it is not a candidate
NUM_COPIES = 4
NO_DEQUANT = 1 << 30
# (block_n, num_warps, num_stages) tried per shape, each with a few K splits; fewer at M = 4.
SWEEP_SHAPES = {1: [(64, 4, 3), (128, 4, 1), (128, 4, 2), (128, 4, 3), (128, 4, 4), (256, 4, 3), (256, 8, 1),
                    (256, 8, 3), (128, 2, 3)],
                4: [(32, 4, 3), (64, 4, 3), (128, 4, 3), (128, 8, 3)]}


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


def gemv_config(m: int, n: int, k: int, num_sms: int) -> W4A16Config:
    """``choose_config``'s GEMV shape for ``m`` rows; past GEMV_MAX_ROWS (where the default is tl.dot) 8 warps, so
    that x's rows stay fewer elements than threads (else Triton re-lays the products out through shared memory)."""
    if m <= GEMV_MAX_ROWS:
        return choose_config(m, n, k, num_sms)
    return W4A16Config(128, triton.next_power_of_2(m), split_for(n, k, 128, 4 * num_sms), 8, 3, gemv=True)


def split_for(n: int, k: int, block_n: int, programs: int) -> int:
    """The K split giving about ``programs`` programs (``choose_config``'s rule, up to 32 slices)."""
    return even_split(triton.cdiv(k, TILE_K), min(32, triton.cdiv(programs, triton.cdiv(n, block_n))), 2)


def dot_config(m: int, n: int, k: int, num_sms: int) -> W4A16Config:
    """``choose_config``'s tl.dot shape for ``m`` rows, also at or below GEMV_MAX_ROWS (where the default is GEMV)."""
    return choose_config(max(m, GEMV_MAX_ROWS + 1), n, k, num_sms)


def time_w4a16(x, weights, num_calls: int, **kwargs) -> float:
    return time_calls(lambda i: w4a16_linear(x, weights[i % NUM_COPIES], dequant_min_rows=NO_DEQUANT, **kwargs),
                      num_calls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    records = []
    print(f"{'shape':8} {'M':>3} {'cuBLAS':>7} {'pagedllm':>8} {'GEMV':>7} {'tl.dot':>7} {'deq+cuBLAS':>10} "
          f"{'GEMV GB/s':>9} {'dot GB/s':>8}  default (us: per call)")
    for name, (n, k) in SHAPES.items():
        weights = random_weights(n, k)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2)]
        for m in ROWS:
            row = {"shape": name, "n": n, "k": k, "rows": m, "default": str(choose_config(m, n, k, num_sms)),
                   **measure(m, dense, weights, args.calls, num_sms)}
            print(f"{name:8} {m:3d} {row['bf16_cublas_us']:7.1f} {row['bf16_pagedllm_us']:8.1f} {row['gemv_us']:7.1f} "
                  f"{row['dot_us']:7.1f} {row['dequant_cublas_us']:10.1f} {row['gemv_gbps']:9.0f} "
                  f"{row['dot_gbps']:8.0f}  {row['default']}")
            records.append(row)
        if args.sweep:
            records += sweep(name, n, k, weights, args.calls, num_sms)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "records": records}, f, indent=1)


def measure(m: int, dense: list[torch.Tensor], weights, num_calls: int, num_sms: int) -> dict:
    """Microseconds per call of each path at ``m`` rows (NaN where a path does not apply), and the W4A16 GB/s."""
    (n, k), nan = dense[0].shape, float("nan")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    row = {"bf16_cublas_us": time_calls(lambda i: F.linear(x, dense[i % 2]), num_calls),
           "bf16_pagedllm_us": time_calls(lambda i: gemm.linear(x, dense[i % 2]), num_calls),
           "gemv_us": (time_w4a16(x, weights, num_calls, config=gemv_config(m, n, k, num_sms))
                       if m <= GEMV_ROWS_MAX_TIMED else nan),
           "dot_us": time_w4a16(x, weights, num_calls, config=dot_config(m, n, k, num_sms)),
           "dequant_cublas_us": (time_calls(lambda i: F.linear(x, dequantize_int4(weights[i % NUM_COPIES], x.dtype)),
                                            max(4, num_calls // 4)) if m >= 8 else nan)}
    gigabytes = int4_bytes(weights[0]) / 1e3  # per microsecond: GB/s
    return {**row, "gemv_gbps": gigabytes / row["gemv_us"], "dot_gbps": gigabytes / row["dot_us"]}


def split_candidates(n: int, k: int, block_n: int, num_sms: int) -> list[int]:
    """K splits giving ~1, 2, 4 and 8 programs per SM."""
    return sorted({split_for(n, k, block_n, per_sm * num_sms) for per_sm in (1, 2, 4, 8)})


def sweep(name: str, n: int, k: int, weights, num_calls: int, num_sms: int) -> list[dict]:
    gigabytes, out = int4_bytes(weights[0]) / 1e3, []
    for m, shapes in SWEEP_SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for block_n, warps, stages in shapes:
            for split in split_candidates(n, k, block_n, num_sms):
                config = W4A16Config(block_n, triton.next_power_of_2(m), split, warps, stages, gemv=True)
                try:
                    us = time_w4a16(x, weights, num_calls, config=config)
                except Exception as exc:  # noqa: BLE001 - out of registers or shared memory: skip the shape
                    print(f"  sweep {name} M={m} {config}: {type(exc).__name__}")
                    continue
                out.append({"shape": name, "rows": m, "sweep": True, "block_n": block_n, "warps": warps,
                            "stages": stages, "split_k": split, "us": us, "gbps": gigabytes / us})
        default = gemv_config(m, n, k, num_sms)
        best = sorted((r for r in out if r["rows"] == m), key=lambda r: r["us"])[:3]
        for r in best:
            print(f"  sweep {name:7} M={m}: {r['us']:6.1f} us {r['gbps']:5.0f} GB/s  block_n={r['block_n']} "
                  f"warps={r['warps']} stages={r['stages']} split_k={r['split_k']}")
        print(f"  sweep {name:7} M={m}: default block_n={default.block_n} warps={default.num_warps} "
              f"stages={default.num_stages} split_k={default.split_k}")
    return out


if __name__ == "__main__":
    main()
