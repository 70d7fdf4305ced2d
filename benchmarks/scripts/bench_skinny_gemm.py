"""The skinny-GEMM kernel against F.linear (cuBLAS) on the real decode shapes of Qwen3-0.6B and Llama-3.1-8B.

    python benchmarks/scripts/bench_skinny_gemm.py [--sweep] [--output-json FILE]

Each time is per call inside a replayed CUDA graph (as in a decode step), over enough distinct copies of the
weight that they do not fit in L2 (a model's layers never do). ``--sweep`` also times a grid of launch shapes
per (shape, rows), to tune ``choose_config``; every swept result is checked against F.linear.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
import triton

from pagedllm.model import skinny_gemm as skinny
from pagedllm.model.skinny_gemm import SkinnyGemmConfig

SHAPES = {  # name -> (N, K)
    "qwen3-0.6b qkv": (4096, 1024), "qwen3-0.6b o": (1024, 2048),
    "qwen3-0.6b gate_up": (6144, 1024), "qwen3-0.6b down": (1024, 3072),
    "qwen3-0.6b lm_head": (151936, 1024),
    "llama-3.1-8b qkv": (6144, 4096), "llama-3.1-8b o": (4096, 4096),
    "llama-3.1-8b gate_up": (28672, 4096), "llama-3.1-8b down": (4096, 14336),
    "llama-3.1-8b lm_head": (128256, 4096),
}
_MIN_BYTES_STREAMED = 512 * 2**20  # weights per graph: several times the 60 MB L2


def time_in_graph(calls: list, replays: int = 20) -> float:
    """Microseconds per call of ``calls`` (closures), captured in order in one CUDA graph and replayed."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / len(calls)


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GB device-to-device copy (read + write): the ceiling to compare with."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = time_in_graph([lambda: dst.copy_(src)], replays=10)
    return 2 * src.numel() / (us * 1e-6)


# (block_n, block_k, num_stages, num_warps): bytes in flight per program = stages x block_n x block_k x 2.
SWEEP_TILES = [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 128, 6, 4),
               (64, 256, 3, 4), (128, 128, 4, 4), (128, 128, 4, 8)]


def sweep_configs(n: int, k: int, num_sms: int) -> list[SkinnyGemmConfig]:
    """Each tile with K unsplit and split to about 1, 2 and 4 programs per SM."""
    configs = []
    for block_n, block_k, num_stages, num_warps in SWEEP_TILES:
        row_blocks = triton.cdiv(n, block_n)
        splits = {max(1, min(triton.cdiv(waves * num_sms, row_blocks), k // block_k)) for waves in (0, 1, 2, 4)}
        configs += [SkinnyGemmConfig(block_n, block_k, split, num_warps, num_stages) for split in sorted(splits)]
    return configs


def _compile(k: int, configs: list[SkinnyGemmConfig]) -> None:
    """Compile (into Triton's disk cache) the variants these configs launch with for inputs of K columns."""
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)  # N only has to share divisibility by 16
    for config in configs:
        try:
            skinny.skinny_gemm(x, weight, None, config)
        except Exception:  # too much shared memory: the sweep records it
            pass
    torch.cuda.synchronize()


def precompile(num_sms: int) -> None:
    """Compile every swept variant in parallel processes first: one by one they took most of a sweep's time."""
    jobs = {}
    for n, k in SHAPES.values():
        for config in sweep_configs(n, k, num_sms):
            jobs.setdefault((k, config.block_n, config.block_k), []).append(config)
    workers = min(12, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, [k for k, _, _ in jobs], list(jobs.values())))


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def bench_shape(name: str, n: int, k: int, rows: list[int], sweep_rows: set[int], num_sms: int) -> list[dict]:
    nbytes = n * k * 2
    copies = max(2, min(64, -(-_MIN_BYTES_STREAMED // nbytes)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    results = []
    for num_rows in rows:
        x = torch.randn(num_rows, k, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(x, weights[0])
        row = {"shape": name, "N": n, "K": k, "rows": num_rows, "weight_mb": nbytes / 1e6,
               "cublas_us": time_in_graph([lambda w=w: F.linear(x, w) for w in weights]),
               "config": vars(skinny.choose_config(n, k, num_sms)).copy(),
               "skinny_us": time_in_graph([lambda w=w: skinny.skinny_gemm(x, w) for w in weights]),
               "error": relative_error(skinny.skinny_gemm(x, weights[0]), expected)}
        if num_rows in sweep_rows:
            row["sweep"] = time_sweep(x, weights, expected, n, k, num_sms)
        results.append(row)
        print_row(row)
    del weights
    torch.cuda.empty_cache()
    return results


def time_sweep(x, weights, expected, n: int, k: int, num_sms: int) -> list[dict]:
    rows = []
    for config in sweep_configs(n, k, num_sms):
        try:
            error = relative_error(skinny.skinny_gemm(x, weights[0], None, config), expected)
            us = time_in_graph([lambda w=w: skinny.skinny_gemm(x, w, None, config) for w in weights], replays=10)
        except Exception as exc:  # a shape that does not fit (shared memory): skip it
            rows.append({"config": vars(config), "failed": type(exc).__name__})
            continue
        rows.append({"config": vars(config), "us": us, "error": error})
    return sorted(rows, key=lambda r: r.get("us", 1e9))


def print_row(row: dict) -> None:
    gbs = lambda us: row["weight_mb"] * 1e3 / us  # noqa: E731  (MB / us = TB/s; x1000 -> GB/s)
    line = (f"{row['shape']:22s} M={row['rows']:2d} {row['weight_mb']:7.1f} MB  cublas {row['cublas_us']:7.2f} us "
            f"({gbs(row['cublas_us']):5.0f} GB/s)  skinny {row['skinny_us']:7.2f} us ({gbs(row['skinny_us']):5.0f} GB/s) "
            f"err {row['error']:.1e}")
    best = next((r for r in row.get("sweep", []) if "us" in r), None)
    if best:
        line += f"  best {best['us']:7.2f} us ({gbs(best['us']):5.0f} GB/s) {best['config']}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--sweep-rows", default="1,16")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    record = {"device": torch.cuda.get_device_name(), "num_sms": num_sms, "copy_bytes_per_s": copy_bandwidth(),
              "results": []}
    print(f"{record['device']}: copy {record['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    if args.sweep:
        precompile(num_sms)
    rows = [int(r) for r in args.rows.split(",")]
    sweep_rows = {int(r) for r in args.sweep_rows.split(",")} if args.sweep else set()
    for name, (n, k) in SHAPES.items():
        record["results"] += bench_shape(name, n, k, rows, sweep_rows, num_sms)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
