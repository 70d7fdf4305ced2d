"""FP8 linear microbenchmark on Llama-3.1-8B's projection shapes (run on a GPU): pagedllm's FP8 path
(``fp8_gemm.fp8_linear``: a Triton decode kernel at <= 64 rows, per-token quantization + ``_scaled_mm`` above; both
decode kernels, W8A8 and weight-only, also timed on their own) against bf16 (``gemm.linear``: the skinny kernel at <= 16 rows, cuBLAS above), per row count M; the FP8
W8A8 kernel's achieved GB/s; and a small sweep of its launch shapes at M = 1 and 64 (``--sweep``).

Times are per call, from CUDA graphs of ``--calls`` calls over rotating weight copies (more bytes than L2 holds),
so launch overhead is out and the weight comes from HBM as in a decode step.
"""

from __future__ import annotations

import argparse
import json

import torch

from cuda_graph_timing import time_calls  # this folder is on sys.path when a script runs

from pagedllm.model import gemm
from pagedllm.model.quantization.fp8_gemm import fp8_linear, quantize_weight
from pagedllm.model.quantization.fp8_triton import Fp8GemmConfig, choose_config, fp8_skinny_gemm, fp8_w8a8_gemm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [1, 16, 64, 256, 1024]
NUM_COPIES = 4
SWEEP = [Fp8GemmConfig(64, 128, s, w, 4) for s in (1, 2, 4, 8) for w in (4, 8)] + \
        [Fp8GemmConfig(128, 128, s, 8, 4) for s in (2, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows_out = []
    for name, (n, k) in SHAPES.items():
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(NUM_COPIES)]
        fp8 = [quantize_weight(w) for w in dense]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_us = time_calls(lambda i: gemm.linear(x, dense[i % NUM_COPIES]), args.calls)
            fp8_us = time_calls(lambda i: fp8_linear(x, *fp8[i % NUM_COPIES], None, "dynamic_token"), args.calls)
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_us": round(bf16_us, 2), "fp8_us": round(fp8_us, 2),
                   "speedup": round(bf16_us / fp8_us, 3)}
            if m <= 64:  # the decode kernels side by side (fp8_us is whichever fp8_gemm.DECODE_KERNEL picks)
                w8a8_us = time_calls(lambda i: fp8_w8a8_gemm(x, *fp8[i % NUM_COPIES], None, "dynamic_token"),
                                     args.calls)
                row["w8a8_us"] = round(w8a8_us, 2)
                row["w8a8_gb_s"] = round(n * k / w8a8_us / 1e3, 1)
            if m <= 16:
                row["weight_only_us"] = round(time_calls(
                    lambda i: fp8_skinny_gemm(x, *fp8[i % NUM_COPIES], None), args.calls), 2)
            if m == 1:
                row["config"] = str(choose_config(n, k, num_sms))
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        for m in (1, 64) if args.sweep else ():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for config in SWEEP:
                us = time_calls(lambda i: fp8_w8a8_gemm(x, *fp8[i % NUM_COPIES], None, "dynamic_token", None,
                                                        config), args.calls)
                sweep_row = {"shape": name, "m": m, "kernel": "w8a8", "config": str(config), "us": round(us, 2),
                             "gb_s": round(n * k / us / 1e3, 1)}
                rows_out.append(sweep_row)
                print(json.dumps(sweep_row), flush=True)
        del dense, fp8
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
