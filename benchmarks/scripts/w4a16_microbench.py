"""W4A16 GEMM microbenchmark on Llama-3.1-8B's projection shapes (run on a GPU), per projection and row count M:
bf16 cuBLAS (``F.linear``), the W4A16 GEMV kernel (no tl.dot; M <= 4), the tl.dot W4A16 kernel with the
inline-asm dequantization (``dot``, forced below ``DEQUANT_MIN_ROWS`` too) and without it (``plain``, the same
values by plain Triton: what the assembly buys; at a few M), dequantize + cuBLAS (M >= 8), and what
``w4a16_linear`` picks by default; the W4A16 kernels also as GB/s of int4 weight + scales + zeros streamed.

Times are per call, from CUDA graphs of ``--calls`` calls over rotating weight copies (more bytes than L2 holds),
so launch overhead is out and the weight comes from HBM as in a decode step (``cuda_graph_timing``). After the
table, per M the four projections summed (a layer), the fastest W4A16 path against bf16, and the dispatch
constants that the measurement implies (``GEMV_MAX_ROWS``, ``DEQUANT_MIN_ROWS``). ``--sweep`` adds launch shapes of
the tl.dot kernel (row block, warps, pipeline depth, K split) at a few M, printing the best per shape against
``dot_config``'s. ``--act-order`` times act-order weights with x gathered inside the kernel and with x permuted
first (``PERMUTE_X_FIRST``). ``--output-json`` keeps every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch
import torch.nn.functional as F
import triton
from cuda_graph_timing import time_calls  # this folder is on sys.path when a script runs

from pagedllm.model.quantization.int4 import Int4Checkpoint, to_canonical
from pagedllm.model.w4a16_kernel import (
    DEQUANT_MIN_ROWS,
    GEMV_MAX_ROWS,
    W4A16Config,
    choose_config,
    dequantize_int4,
    dot_config,
    gemv_config,
    w4a16_linear,
)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
GEMV_ROWS_TIMED = 4  # the GEMV kernel's instructions per weight grow ~2.5x from 1 to 4 rows: not a candidate past
PLAIN_ROWS = (1, 16, 64)
NUM_COPIES = 4
NO_DEQUANT = 1 << 30
PATHS = ("gemv", "dot", "dequant")  # the W4A16 paths w4a16_linear chooses between
# tl.dot launch shapes (block_n, num_warps, num_stages) tried at SWEEP_ROWS, by dot_config's block_m (x's rows
# padded), each at dot_config's K split and half and twice it: around dot_config's (64, 4, 3), the best of session
# 29's sweep, its pipeline one stage deeper and shallower, and the 128-row blocks it replaced. (32-row blocks leave
# wgmma for mma.sync and re-lay the weights out through shared memory: 6.9 SASS instructions a weight against 3.6,
# w4a16_gemv_sass.py; not swept.)
SWEEP_ROWS = (1, 16, 64, 128)
SWEEP_SHAPES = {16: [(64, 4, 3), (64, 4, 4), (64, 4, 2), (64, 8, 3), (128, 4, 3), (128, 8, 3)],
                64: [(64, 4, 3), (64, 4, 4), (64, 4, 2), (64, 8, 3), (128, 8, 3)],
                128: [(64, 4, 3), (64, 4, 2), (64, 8, 3), (128, 8, 3)]}


def random_weights(n: int, k: int, group_size: int = 128, act_order: bool = False):
    """NUM_COPIES random weights (act-order: a shuffled g_idx of full groups, as GPTQ's desc_act writes)."""
    out = []
    for seed in range(NUM_COPIES):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.int32)
        scales = torch.rand(n, k // group_size, device="cuda", generator=gen) * 0.01
        zeros = torch.randint(0, 16, (n, k // group_size), device="cuda", generator=gen)
        g_idx = (torch.randperm(k, device="cuda", generator=gen) // group_size).int() if act_order else None
        out.append(to_canonical(Int4Checkpoint(q, scales, zeros, g_idx, group_size), torch.float16, "bench"))
    return out


def int4_bytes(weight) -> int:
    return sum(t.numel() * t.element_size() for t in (weight.qweight, weight.scales, weight.zeros))


def time_w4a16(x, weights, num_calls: int, **kwargs) -> float:
    return time_calls(lambda i: w4a16_linear(x, weights[i % NUM_COPIES], **kwargs), num_calls)


def time_kernel(x, weights, num_calls: int, config: W4A16Config) -> float:
    """One kernel forced (``config``), never the dequantize + cuBLAS path; NaN when it cannot launch."""
    try:
        return time_w4a16(x, weights, num_calls, config=config, dequant_min_rows=NO_DEQUANT)
    except Exception as exc:  # noqa: BLE001 - out of registers or shared memory: not a candidate
        print(f"  {config}: {type(exc).__name__}: {str(exc)[:120]}")
        return float("nan")


def measure(m: int, dense: list[torch.Tensor], weights, num_calls: int, num_sms: int) -> dict:
    """Microseconds per call of each path at ``m`` rows (NaN where a path is not timed), and the W4A16 GB/s."""
    (n, k), nan = dense[0].shape, float("nan")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dot = dot_config(m, n, k, num_sms)
    row = {"bf16_us": time_calls(lambda i: F.linear(x, dense[i % 2]), num_calls),
           "gemv_us": time_kernel(x, weights, num_calls, gemv_config(m, n, k, num_sms)) if m <= GEMV_ROWS_TIMED
           else nan,
           "dot_us": time_kernel(x, weights, num_calls, dot),
           "plain_us": (time_kernel(x, weights, num_calls, dataclasses.replace(dot, asm_dequant=False))
                        if m in PLAIN_ROWS else nan),
           "dequant_us": (time_calls(lambda i: F.linear(x, dequantize_int4(weights[i % NUM_COPIES], x.dtype)),
                                     max(4, num_calls // 4)) if m >= 8 else nan),
           "default_us": time_w4a16(x, weights, num_calls)}
    gigabytes = int4_bytes(weights[0]) / 1e3  # per microsecond: GB/s
    return {**row, "gemv_gbps": gigabytes / row["gemv_us"], "dot_gbps": gigabytes / row["dot_us"]}


def print_row(row: dict) -> None:
    print(f"{row['shape']:8} {row['rows']:3d} {row['bf16_us']:7.1f} {row['gemv_us']:7.1f} {row['dot_us']:7.1f} "
          f"{row['plain_us']:7.1f} {row['dequant_us']:8.1f} {row['default_us']:8.1f} {row['gemv_gbps']:6.0f} "
          f"{row['dot_gbps']:6.0f}  {row['dot_config']}")


def brief(config: W4A16Config) -> str:
    """block_n x block_m / split_k, warps, stages (and which kernel)."""
    kernel = "gemv" if config.gemv else "dot"
    return (f"{kernel} {config.block_n}x{config.block_m}/{config.split_k} w{config.num_warps} "
            f"s{config.num_stages}")


def summarize(records: list[dict]) -> None:
    """Per M, a layer (the four projections summed) by path, the best W4A16 path against bf16, and the dispatch
    constants the measurement implies."""
    print(f"\nlayer (4 projections), us:\n{'M':>4} {'bf16':>7} {'gemv':>7} {'dot':>7} {'dequant':>8} {'default':>8}"
          f"  best    best/bf16")
    best_path = {}
    for m in ROWS:
        rows = [r for r in records if r["rows"] == m and not r.get("sweep") and not r.get("act_order")]
        layer = {key: sum(r[f"{key}_us"] for r in rows) for key in ("bf16", *PATHS, "default")}
        timed = {path: layer[path] for path in PATHS if not math.isnan(layer[path])} or {"none": math.nan}
        best_path[m] = min(timed, key=timed.get)
        print(f"{m:4d} {layer['bf16']:7.1f} {layer['gemv']:7.1f} {layer['dot']:7.1f} {layer['dequant']:8.1f} "
              f"{layer['default']:8.1f}  {best_path[m]:7} {timed[best_path[m]] / layer['bf16']:5.2f}")
    gemv_max = max([0, *(m for m in ROWS if all(best_path[r] == "gemv" for r in ROWS if r <= m))])
    dequant_from = min([NO_DEQUANT, *(m for m in ROWS if all(best_path[r] == "dequant" for r in ROWS if r >= m))])
    print(f"implied: GEMV_MAX_ROWS = {gemv_max} (now {GEMV_MAX_ROWS}), DEQUANT_MIN_ROWS = "
          f"{dequant_from if dequant_from < NO_DEQUANT else f'> {ROWS[-1]}'} (now {DEQUANT_MIN_ROWS}; measured rows "
          f"{ROWS}: the switch lies between the last row count the kernel wins and this one)")


def k_splits(default: int, k: int) -> list[int]:
    """dot_config's K split, half and twice it, where they divide K's tiles (at least two tiles a slice)."""
    tiles = triton.cdiv(k, 128)
    return sorted({s for s in (max(1, default // 2), default, default * 2) if tiles % s == 0 and tiles // s >= 2})


def shape_of(record) -> tuple[int, int, int]:
    """(block_n, warps, stages) of a sweep record or a W4A16Config."""
    if isinstance(record, W4A16Config):
        return record.block_n, record.num_warps, record.num_stages
    return record["block_n"], record["warps"], record["stages"]


def summarize_sweep(records: list[dict], num_sms: int) -> None:
    """Per swept M, the launch shape whose layer (the four projections, each at its best K split) is fastest,
    against dot_config's shape."""
    print("\nsweep, layer (4 projections, each at its best K split), us:")
    for m in SWEEP_ROWS:
        layer = {}
        for shape in {shape_of(r) for r in records if r.get("sweep") and r["rows"] == m}:
            per_projection = [min((r["us"] for r in records if r.get("sweep") and r["rows"] == m
                                   and r["shape"] == name and shape_of(r) == shape), default=math.nan)
                              for name in SHAPES]
            layer[shape] = sum(per_projection)
        ranked = sorted((us, shape) for shape, us in layer.items() if not math.isnan(us))
        default = shape_of(dot_config(m, *SHAPES["qkv"], num_sms))
        print(f"  M={m:3d}: " + ", ".join(f"{shape} {us:.1f}" for us, shape in ranked[:3])
              + f"; dot_config {default} {layer.get(default, math.nan):.1f}  (block_n, warps, stages)")


def sweep(name: str, n: int, k: int, weights, num_calls: int, num_sms: int) -> list[dict]:
    gigabytes, out = int4_bytes(weights[0]) / 1e3, []
    for m in SWEEP_ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        default = dot_config(m, n, k, num_sms)
        for block_n, warps, stages in SWEEP_SHAPES[default.block_m]:
            for split in k_splits(default.split_k, k):
                config = dataclasses.replace(default, block_n=block_n, num_warps=warps, num_stages=stages,
                                             split_k=split)
                us = time_kernel(x, weights, num_calls, config)
                out.append({"shape": name, "rows": m, "sweep": True, "block_n": block_n, "block_m": config.block_m,
                            "warps": warps, "stages": stages, "split_k": split, "us": us, "gbps": gigabytes / us})
        timed = [r for r in out if r["rows"] == m and not math.isnan(r["us"])]
        best = min(timed, key=lambda r: r["us"])
        mine = [r["us"] for r in timed if shape_of(r) == shape_of(default) and r["split_k"] == default.split_k]
        print(f"  sweep {name:7} M={m:3d}: best {best['us']:6.1f} us {best['gbps']:5.0f} GB/s {shape_of(best)} "
              f"split_k={best['split_k']}; dot_config {mine[0] if mine else math.nan:6.1f} us {shape_of(default)} "
              f"split_k={default.split_k}")
    return out


ACT_ORDER_ROWS = (1, 16, 64, 128)


def act_order(name: str, n: int, k: int, plain_weights, num_calls: int) -> list[dict]:
    """Act-order weights (desc_act), the default kernel at ACT_ORDER_ROWS: x gathered through ``perm`` inside the
    kernel against x permuted by torch first (``PERMUTE_X_FIRST``), next to the same shape without act-order."""
    weights, out = random_weights(n, k, act_order=True), []
    for m in ACT_ORDER_ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row = {"shape": name, "rows": m, "act_order": True,
               "gather_us": time_w4a16(x, weights, num_calls, dequant_min_rows=NO_DEQUANT, permute_x_first=False),
               "permute_first_us": time_w4a16(x, weights, num_calls, dequant_min_rows=NO_DEQUANT,
                                              permute_x_first=True),
               "no_act_order_us": time_w4a16(x, plain_weights, num_calls, dequant_min_rows=NO_DEQUANT)}
        print(f"  act-order {name:7} M={m:3d}: gather in the kernel {row['gather_us']:6.1f} us, x permuted first "
              f"{row['permute_first_us']:6.1f} us, without act-order {row['no_act_order_us']:6.1f} us")
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--act-order", action="store_true", help="also time act-order weights both ways")
    args = parser.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    records = []
    print(f"{'shape':8} {'M':>3} {'bf16':>7} {'gemv':>7} {'dot':>7} {'plain':>7} {'dequant':>8} {'default':>8} "
          f"{'GEMV':>6} {'dot':>6}  dot_config: block_n x block_m / split_k (us per call; GB/s of int4)")
    for name, (n, k) in SHAPES.items():
        weights = random_weights(n, k)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2)]
        for m in ROWS:
            row = {"shape": name, "n": n, "k": k, "rows": m, "default": brief(choose_config(m, n, k, num_sms)),
                   "dot_config": brief(dot_config(m, n, k, num_sms)), **measure(m, dense, weights, args.calls, num_sms)}
            print_row(row)
            records.append(row)
        if args.sweep:
            records += sweep(name, n, k, weights, args.calls, num_sms)
        if args.act_order:
            records += act_order(name, n, k, weights, args.calls)
        del weights, dense
    summarize(records)
    if args.sweep:
        summarize_sweep(records, num_sms)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
