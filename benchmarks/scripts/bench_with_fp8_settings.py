"""``python -m pagedllm.bench`` with ``fp8_gemm``'s kernel switches set first, in the same process:
``bench_with_fp8_settings.py NAME=VALUE[,NAME=VALUE...] BENCH_ARGS...``, e.g.
``FUSED_QUANT_MAX_ROWS=0`` or ``GEMV_MAX_ROWS=0,TRITON_MAX_ROWS=64`` (whole numbers become ints)."""

from __future__ import annotations

import runpy
import sys

from pagedllm.model.quantization import fp8_gemm


def apply(settings: str) -> None:
    for item in filter(None, settings.split(",")):
        name, value = item.split("=", 1)
        if not name.isupper() or not hasattr(fp8_gemm, name):
            raise SystemExit(f"fp8_gemm has no switch {name!r}")
        setattr(fp8_gemm, name, int(value) if value.isdigit() else value)
        print(f"[fp8 settings] fp8_gemm.{name} = {getattr(fp8_gemm, name)!r}", flush=True)


if __name__ == "__main__":
    apply(sys.argv[1])
    sys.argv = ["bench", *sys.argv[2:]]
    runpy.run_module("pagedllm.bench", run_name="__main__")
