"""FP8 linear microbenchmark on Llama-3.1-8B's projection shapes (run on a GPU with FP8 tensor cores).

For each shape and row count M (1, 4, 16, 64, 128) one JSON line: microseconds per call and the weight's TB/s of
bf16 (``gemm.linear``: the skinny kernel up to 16 rows, cuBLAS above), of ``fp8_linear`` as dispatched now
(``path`` names the kernel ``fp8_gemm.triton_path`` picks), and of each alternative on its own: ``gemv`` (M <= 4),
``w8a8`` (per-row quantization launch + FP8 dot), ``w8a8_fused`` (quantized inside the GEMM), ``weight_only``
(widened FP8 tile, bf16 dot) and ``scaled_mm`` (quantization launch + cuBLASLt, M >= 16). Then, per M, the sum
over the four shapes (one layer's projections) of each, and the best alternative per shape.

``--sweep gemv,w8a8,w8a8_fused`` also times launch shapes of those kernels (gemv at M = 1 and 4, the others at 64)
and prints the best per shape.

Times are per call, from CUDA graphs of ``--calls`` calls over rotating weight copies (more bytes than L2 holds),
so launch overhead is out and the weight comes from HBM as in a decode step.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable

import torch
from cuda_graph_timing import time_calls  # this folder is on sys.path when a script runs

from pagedllm.model import gemm
from pagedllm.model.quantization import fp8_gemm
from pagedllm.model.quantization.fp8_gemm import fp8_linear, quantize_weight, triton_path
from pagedllm.model.quantization.fp8_gemv import fp8_gemv
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig, fp8_w8a8_gemm, fp8_weight_only_gemm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [1, 4, 16, 64, 128]
NUM_COPIES = 4
SCHEME = "dynamic_token"  # online FP8
DEVICE, DTYPE = "cuda", torch.bfloat16
GEMV_SWEEP = [Fp8GemmConfig(bn, bk, 1, 4, 3) for bn, bk in ((4, 512), (8, 512), (16, 512), (8, 1024), (16, 256),
                                                             (32, 128))] + \
             [Fp8GemmConfig(8, 512, 1, 4, 1), Fp8GemmConfig(8, 512, 1, 4, 4), Fp8GemmConfig(8, 512, 1, 8, 3),
              Fp8GemmConfig(16, 512, 1, 8, 2), Fp8GemmConfig(8, 512, 2, 4, 3)]
GEMM_SWEEP = [Fp8GemmConfig(64, 128, 1, 4, 4), Fp8GemmConfig(64, 128, 2, 4, 4), Fp8GemmConfig(128, 128, 1, 4, 4),
              Fp8GemmConfig(128, 128, 2, 4, 4), Fp8GemmConfig(128, 128, 4, 8, 4), Fp8GemmConfig(128, 64, 2, 4, 5),
              Fp8GemmConfig(64, 256, 1, 4, 3), Fp8GemmConfig(256, 128, 1, 8, 3)]

Fp8Call = Callable[[torch.Tensor, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def alternatives(num_rows: int) -> dict[str, Fp8Call]:
    """Each FP8 kernel that can serve ``num_rows`` rows, called directly: fn(x, (weight, scale))."""
    calls: dict[str, Fp8Call] = {"fp8": lambda x, w: fp8_linear(x, *w, None, SCHEME)}
    if num_rows <= 4:
        calls["gemv"] = lambda x, w: fp8_gemv(x, *w)
    calls["w8a8"] = lambda x, w: fp8_w8a8_gemm(x, *w, None, SCHEME)
    calls["w8a8_fused"] = lambda x, w: fp8_w8a8_gemm(x, *w, None, SCHEME, fuse_quantization=True)
    calls["weight_only"] = lambda x, w: fp8_weight_only_gemm(x, *w)
    if num_rows >= 16:
        calls["scaled_mm"] = lambda x, w: fp8_gemm._scaled_mm_linear(x, *w, None, SCHEME, None)
    return calls


def timed(fn: Callable[[int], object], num_calls: int) -> float | str:
    """Microseconds per call, or the error (a launch shape may not fit the GPU): one failure is a result."""
    try:
        return round(time_calls(fn, num_calls), 2)
    except Exception as error:  # noqa: BLE001
        return f"error: {type(error).__name__}: {str(error)[:120]}"


def tb_s(num_bytes: int, us: float | str) -> float | None:
    return round(num_bytes / us / 1e6, 2) if isinstance(us, float) else None


def measure_shape(name: str, n: int, k: int, calls: int) -> list[dict]:
    dense = [torch.randn(n, k, device=DEVICE, dtype=DTYPE) / k**0.5 for _ in range(NUM_COPIES)]
    fp8 = [quantize_weight(w) for w in dense]
    rows = []
    for m in ROWS:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
        row = {"shape": name, "n": n, "k": k, "m": m, "path": triton_path(m, SCHEME) or "scaled_mm"}
        row["bf16_us"] = timed(lambda i, x=x: gemm.linear(x, dense[i % NUM_COPIES]), calls)
        row["bf16_tb_s"] = tb_s(2 * n * k, row["bf16_us"])
        for kernel, fn in alternatives(m).items():
            row[f"{kernel}_us"] = timed(lambda i, fn=fn, x=x: fn(x, fp8[i % NUM_COPIES]), calls)
            row[f"{kernel}_tb_s"] = tb_s(n * k, row[f"{kernel}_us"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def sweep_shape(name: str, n: int, k: int, kernels: list[str], calls: int) -> list[dict]:
    """Each launch shape of each swept kernel; the best one per (kernel, M) printed last."""
    fp8 = [quantize_weight(torch.randn(n, k, device=DEVICE, dtype=DTYPE) / k**0.5)
           for _ in range(NUM_COPIES)]
    results = []
    for kernel in kernels:
        for m in (1, 4) if kernel == "gemv" else (64,):
            x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
            for config in GEMV_SWEEP if kernel == "gemv" else GEMM_SWEEP:
                fn = _configured(kernel, config)
                us = timed(lambda i, fn=fn, x=x: fn(x, fp8[i % NUM_COPIES]), calls)
                results.append({"sweep": kernel, "shape": name, "m": m, "config": str(config), "us": us,
                                "tb_s": tb_s(n * k, us)})
                print(json.dumps(results[-1]), flush=True)
    return results


def _configured(kernel: str, config: Fp8GemmConfig) -> Fp8Call:
    if kernel == "gemv":
        return lambda x, w: fp8_gemv(x, *w, None, config)
    if kernel == "weight_only":
        return lambda x, w: fp8_weight_only_gemm(x, *w, None, config)
    return lambda x, w: fp8_w8a8_gemm(x, *w, None, SCHEME, None, config, fuse_quantization=kernel == "w8a8_fused")


def print_summaries(rows: list[dict], sweep: list[dict]) -> None:
    """Per M, one layer's four projections summed per kernel; the best alternative per shape; the best swept shape."""
    per_m: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        for key, value in row.items():
            if key.endswith("_us") and isinstance(value, float):
                per_m[row["m"]][key[:-3]] += value
        times = {key[:-3]: v for key, v in row.items() if key.endswith("_us") and isinstance(v, float)
                 and key not in ("bf16_us", "fp8_us")}
        if not times:
            continue
        best = min(times, key=times.get)
        print(f"best m={row['m']:<4} {row['shape']:<8} {best:<12} {times[best]:8.2f} us  "
              f"(bf16 {row['bf16_us']} us, fp8 now {row['fp8_us']} us via {row['path']})")
    for m, sums in per_m.items():
        print(f"layer sum m={m:<4} " + "  ".join(f"{k} {v:.1f}" for k, v in sorted(sums.items(), key=lambda kv: kv[1])))
    best_swept: dict[tuple, dict] = {}
    for result in sweep:
        key = (result["sweep"], result["shape"], result["m"])
        if isinstance(result["us"], float) and (key not in best_swept or result["us"] < best_swept[key]["us"]):
            best_swept[key] = result
    for (kernel, shape, m), result in best_swept.items():
        print(f"sweep best {kernel:<11} {shape:<8} m={m:<3} {result['us']:8.2f} us {result['tb_s']} TB/s  "
              f"{result['config']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--sweep", default="", help="comma-separated kernels to sweep: gemv, w8a8, w8a8_fused, "
                                                    "weight_only")
    parser.add_argument("--skip-main", action="store_true", help="only the sweep")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    kernels = [kernel for kernel in args.sweep.split(",") if kernel]
    rows, sweep = [], []
    for name, (n, k) in SHAPES.items():
        if not args.skip_main:
            rows += measure_shape(name, n, k, args.calls)
        sweep += sweep_shape(name, n, k, kernels, args.calls)
    print_summaries(rows, sweep)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows, "sweep": sweep}, f, indent=1)


if __name__ == "__main__":
    main()
