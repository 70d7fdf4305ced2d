"""FP8 linear microbenchmark on Llama-3.1-8B's projection shapes (run on a GPU with FP8 tensor cores).

For each shape and row count M (1, 4, 16, 64, 128) one JSON line: microseconds per call and the weight's TB/s of
bf16 (``gemm.linear``: the skinny kernel up to 16 rows, cuBLAS above), of ``fp8_linear`` as dispatched now
(``path`` names the kernel ``fp8_gemm.triton_path`` picks), and of each alternative on its own: ``gemv`` (M <= 4),
``w8a8`` (per-row quantization launch + FP8 dot), ``w8a8_fused`` (quantized inside the GEMM), ``weight_only``
(widened FP8 tile, bf16 dot) and ``scaled_mm`` (quantization launch + cuBLASLt, M >= 16). Then, per M, the sum
over the four shapes (one layer's projections) of each, and the best alternative per shape.

``--sweep gemv,w8a8,w8a8_fused`` also times launch shapes of those kernels (gemv at M = 1 and 4, the others at 64)
and prints the best per shape.

``--tma`` times the TMA + wgmma W8A8 GEMM (``fp8_tma``: its ``choose_config`` shape and the candidates of
``tma_candidates``) against bf16 (``F.linear``, i.e. cuBLAS, and ``gemm.linear``: the skinny kernel at 16 rows),
``_scaled_mm``, and the cp.async ``w8a8`` at M = 16, 32, 64, 128, 256 (``TMA_ROWS``), prints one table line per
shape and M (us; TB/s of the weight for the best TMA shape) and the layer sums, then ``TUNED_CONFIGS`` and
``TMA_MAX_ROWS`` as measured, ready to paste into ``fp8_tma`` / ``fp8_gemm``. With ``--skip-main`` about 90 s
on an H200, most of it compiling the ~35 launch shapes.

``--fused-input`` times, at one row, the op before each projection and the GEMV as two launches (triton_ops'
RMSNorm with the residual add, or SiLU-and-mul, then ``fp8_gemv``) against one (``fp8_rms_norm_gemv`` before qkv and
gate_up, ``fp8_silu_mul_gemv`` before down), and their layer sums.

Times are per call, from CUDA graphs of ``--calls`` calls over rotating weight copies (more bytes than L2 holds),
so launch overhead is out and the weight comes from HBM as in a decode step.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import torch
from cuda_graph_timing import time_calls  # this folder is on sys.path when a script runs

from pagedllm.model import gemm
from pagedllm.model.quantization import fp8_gemm, fp8_tma
from pagedllm.model.quantization.fp8_gemm import fp8_linear, quantize_weight, triton_path
from pagedllm.model import triton_ops
from pagedllm.model.quantization.fp8_gemv import fp8_gemv, fp8_rms_norm_gemv, fp8_silu_mul_gemv
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig, fp8_w8a8_gemm, fp8_weight_only_gemm
from pagedllm.model.split_k import sm_count

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

TMA_ROWS = [16, 32, 64, 128, 256]
# (BLOCK_N, BLOCK_K, stages) tried besides choose_config's shape at each M; K split by fp8_tma.balanced_split.
TMA_SHAPES = [(128, 128, 4), (64, 128, 6), (128, 256, 3), (256, 128, 3)]

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


def weight_copies(n: int, k: int) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``NUM_COPIES`` random dense weights [n, k] and their FP8 quantizations (weight, scale): calls rotate over
    them so that each reads its weight from HBM."""
    dense = [torch.randn(n, k, device=DEVICE, dtype=DTYPE) / k**0.5 for _ in range(NUM_COPIES)]
    return dense, [quantize_weight(w) for w in dense]


def measure_shape(name: str, n: int, k: int, calls: int) -> list[dict]:
    dense, fp8 = weight_copies(n, k)
    rows = []
    for m in ROWS:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
        row = {"shape": name, "n": n, "k": k, "m": m,
               "path": triton_path(m, SCHEME, tma=fp8_gemm.TMA_MAX_ROWS > 0) or "scaled_mm"}
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


FUSED_INPUT = {"qkv": "norm", "gate_up": "norm", "down": "silu"}  # the op before each projection in a layer


def fused_input_shape(name: str, n: int, k: int, calls: int) -> dict | None:
    """One row: the op before projection ``name`` then the GEMV (two launches) against the fused GEMV (one)."""
    op = FUSED_INPUT.get(name)
    if op is None:
        return None
    _, fp8 = weight_copies(n, k)
    eps = 1e-6
    if op == "norm":
        x, residual = (torch.randn(1, k, device=DEVICE, dtype=DTYPE) for _ in range(2))
        norm_weight = torch.randn(k, device=DEVICE, dtype=DTYPE)
        separate = lambda i: fp8_gemv(triton_ops.fused_add_rms_norm(x, residual, norm_weight, eps)[0],
                                      *fp8[i % NUM_COPIES])
        fused = lambda i: fp8_rms_norm_gemv(x, residual, norm_weight, eps, *fp8[i % NUM_COPIES])
        plain = x
    else:
        gate_up = torch.randn(1, 2 * k, device=DEVICE, dtype=DTYPE)
        separate = lambda i: fp8_gemv(triton_ops.silu_and_mul(gate_up), *fp8[i % NUM_COPIES])
        fused = lambda i: fp8_silu_mul_gemv(gate_up, *fp8[i % NUM_COPIES])
        plain = gate_up[:, :k].contiguous()
    row = {"fused_input": op, "shape": name, "n": n, "k": k, "separate_us": timed(separate, calls),
           "fused_us": timed(fused, calls),
           "gemv_us": timed(lambda i: fp8_gemv(plain, *fp8[i % NUM_COPIES]), calls)}
    print(json.dumps(row), flush=True)
    return row


def print_fused_input_summary(rows: list[dict]) -> None:
    sums = {key: sum(row[key] for row in rows if isinstance(row[key], float))
            for key in ("separate_us", "fused_us", "gemv_us")}
    print("fused input, m=1, qkv + gate_up + down: " + "  ".join(f"{k[:-3]} {v:.1f} us" for k, v in sums.items()))


def tma_candidates(n: int, k: int, block_m: int, num_sms: int) -> list[Fp8GemmConfig]:
    """choose_config's shape, that shape unsplit and split twice as much, and ``TMA_SHAPES`` (those whose ring
    fits in shared memory and whose accumulator fits in 128 registers a thread at 8 warps)."""
    default = fp8_tma.choose_config(n, k, num_sms, block_m)
    configs = [default, replace(default, split_k=1), replace(default, split_k=2 * default.split_k)]
    for block_n, block_k, stages in TMA_SHAPES:
        stages = fp8_tma.ring_depth(block_n, block_m, block_k, stages)
        if stages >= 2 and block_n * block_m <= 128 * 256:
            configs.append(fp8_tma.launch_shape(n, k, num_sms, block_m, block_n, block_k, stages))
    return list(dict.fromkeys(configs))


def tma_shape(name: str, n: int, k: int, calls: int) -> list[dict]:
    """Per M of ``TMA_ROWS``: us per call of bf16, _scaled_mm, w8a8 (up to its 128 rows) and each TMA candidate."""
    dense, fp8 = weight_copies(n, k)
    rows = []
    for m in TMA_ROWS:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
        row = {"shape": name, "n": n, "k": k, "m": m, "tma": {}}
        row["bf16_cublas_us"] = timed(lambda i, x=x: torch.nn.functional.linear(x, dense[i % NUM_COPIES]), calls)
        row["bf16_us"] = timed(lambda i, x=x: gemm.linear(x, dense[i % NUM_COPIES]), calls)
        row["scaled_mm_us"] = timed(lambda i, x=x: fp8_gemm._scaled_mm_linear(x, *fp8[i % NUM_COPIES], None, SCHEME,
                                                                                None), calls)
        if m <= 128:
            row["w8a8_us"] = timed(lambda i, x=x: fp8_w8a8_gemm(x, *fp8[i % NUM_COPIES], None, SCHEME), calls)
        for config in tma_candidates(n, k, fp8_tma.block_m_for(m), sm_count(x.device)):
            row["tma"][str(config)] = timed(lambda i, x=x, c=config: fp8_tma.fp8_w8a8_tma_gemm(
                x, *fp8[i % NUM_COPIES], None, SCHEME, None, c), calls)
        rows.append(row)
        print(_tma_line(row), flush=True)
    return rows


def _best_tma(row: dict) -> tuple[str, float] | None:
    times = {config: us for config, us in row["tma"].items() if isinstance(us, float)}
    return min(times.items(), key=lambda item: item[1]) if times else None


def _tma_line(row: dict) -> str:
    cells = "  ".join(f"{key[:-3]} {row[key]}" for key in ("bf16_cublas_us", "bf16_us", "scaled_mm_us", "w8a8_us")
                      if key in row)
    default = next(iter(row["tma"].values()), None)
    best = _best_tma(row)
    best_text = f"{best[1]:.2f} us {tb_s(row['n'] * row['k'], best[1])} TB/s {best[0]}" if best else "none"
    return (f"tma m={row['m']:<4} {row['shape']:<8} {cells}  tma_default {default}  tma_best {best_text}")


def print_tma_summary(rows: list[dict]) -> None:
    """Per M the layer sums (bf16, _scaled_mm, w8a8, TMA best), then the constants to paste: TUNED_CONFIGS
    (each shape's best TMA launch, where it differs from choose_config's) and TMA_MAX_ROWS (the largest M up to
    which the TMA layer sum beat _scaled_mm's and w8a8's at every measured M)."""
    tma_max_rows, winning = 0, True
    for m in TMA_ROWS:
        at_m = [row for row in rows if row["m"] == m]
        sums = {key[:-3]: sum(row[key] for row in at_m) for key in ("bf16_cublas_us", "bf16_us", "scaled_mm_us",
                                                                     "w8a8_us")
                if all(isinstance(row.get(key), float) for row in at_m)}
        if all(_best_tma(row) for row in at_m):
            sums["tma_best"] = sum(_best_tma(row)[1] for row in at_m)
            rivals = [value for key, value in sums.items() if key in ("scaled_mm", "w8a8")]
            if m > fp8_gemm.FUSED_QUANT_MAX_ROWS:
                winning = winning and sums["tma_best"] < min(rivals, default=float("inf"))
                tma_max_rows = m if winning else tma_max_rows
        print(f"tma layer sum m={m:<4} " + "  ".join(f"{k} {v:.1f}" for k, v in sorted(sums.items(),
                                                                                     key=lambda kv: kv[1])))
    tuned = []
    for row in rows:
        best, block_m = _best_tma(row), fp8_tma.block_m_for(row["m"])
        if best and best[0] != next(iter(row["tma"])):
            tuned.append(f"    ({row['n']}, {row['k']}, {block_m}): {best[0]},")
    print("TUNED_CONFIGS = {  # fp8_tma\n" + "\n".join(tuned) + "\n}")
    print(f"TMA_MAX_ROWS = {tma_max_rows}  # fp8_gemm (the TMA GEMM beat _scaled_mm and w8a8 at every M up to here)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--sweep", default="", help="comma-separated kernels to sweep: gemv, w8a8, w8a8_fused, "
                                                    "weight_only")
    parser.add_argument("--skip-main", action="store_true", help="only the sweep / TMA table")
    parser.add_argument("--tma", action="store_true", help="the TMA GEMM's table (module docstring)")
    parser.add_argument("--fused-input", action="store_true", help="the fused-input GEMVs' table (module docstring)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    kernels = [kernel for kernel in args.sweep.split(",") if kernel]
    rows, sweep, tma_rows, fused_rows = [], [], [], []
    for name, (n, k) in SHAPES.items():
        if not args.skip_main:
            rows += measure_shape(name, n, k, args.calls)
        sweep += sweep_shape(name, n, k, kernels, args.calls)
        if args.tma:
            tma_rows += tma_shape(name, n, k, args.calls)
        if args.fused_input:
            fused_rows += filter(None, [fused_input_shape(name, n, k, args.calls)])
    print_summaries(rows, sweep)
    if args.tma:
        print_tma_summary(tma_rows)
    if fused_rows:
        print_fused_input_summary(fused_rows)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows, "sweep": sweep, "tma": tma_rows,
                       "fused_input": fused_rows}, f, indent=1)


if __name__ == "__main__":
    main()
