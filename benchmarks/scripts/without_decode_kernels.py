"""Run a module or script with some of issue 14's decode kernels switched off (or on), to time a tree with and
without them in the same device call (the same GPU, clocks and other code):

    python benchmarks/scripts/without_decode_kernels.py skinny_gemm -m pagedllm.bench latency --model ...
    python benchmarks/scripts/without_decode_kernels.py +pdl,rotary_store benchmarks/scripts/profile_decode_kernels.py

Switches (comma-separated; a leading ``+`` switches on what is off by default): ``skinny_gemm`` (linear layers and
the LM head back on cuBLAS, which also ends the fusions that ride on the skinny GEMM), ``decode_rotary`` (rotary and
the K/V store in their own launch again, not inside the decode attention kernel), ``rotary_store`` (the attention
backend stores K/V again, not the rotary kernel), ``+fused_norm_act`` (RMSNorm and SiLU-and-mul inside the skinny
GEMM's prologue), ``+norm_epilogue`` (the residual add and RMSNorm after the o projection in its epilogue),
``graph_logits`` (the LM head outside the decode graphs again: inside by default), ``pdl`` (no
programmatic dependent launch: on by default, ``PAGEDLLM_PDL``), ``+pdl`` (PDL with the next kernel placed after each
one's wait, the default), ``+pdl_late`` (the same, placed after each GEMM's and attention kernel's main loop),
``split_tiles=N`` (each decode attention split attends to at least N key tiles: ``triton_paged.MIN_TILES_PER_SPLIT``).
The engine must run in this process (the offline LLM does).
"""

from __future__ import annotations

import runpy
import sys
import types


def switch(names: list[str]) -> None:
    from pagedllm import pdl
    from pagedllm.attention import triton_paged
    from pagedllm.model import gemm, layers
    from pagedllm.worker import model_runner

    for name in names:
        if name == "skinny_gemm":
            gemm._skinny_gemm = lambda: types.SimpleNamespace(accepts=lambda x, weight: False)
        elif name == "+norm_epilogue":
            layers.FUSE_NORM_INTO_OUTPUT = True
        elif name == "decode_rotary":
            layers.FUSE_ROTARY_INTO_DECODE = False
        elif name == "rotary_store":
            layers.stores_kv_with_rotary = lambda rope: False
        elif name == "+fused_norm_act":
            layers.FUSE_NORM_AND_ACTIVATION_INTO_GEMM = True
        elif name in ("+graph_logits", "graph_logits"):
            model_runner.LOGITS_IN_DECODE_GRAPHS = name.startswith("+")
        elif name == "pdl":
            pdl.ENABLED = False
        elif name == "+pdl":
            pdl.ENABLED = True
        elif name == "+pdl_late":
            pdl.ENABLED, pdl.TRIGGER = True, "late"
        elif name.startswith("split_tiles="):
            triton_paged.MIN_TILES_PER_SPLIT = int(name.split("=", 1)[1])
        elif name:
            raise SystemExit(f"unknown switch {name!r}")


def main() -> None:
    switch(sys.argv[1].split(","))
    if sys.argv[2] == "-m":
        sys.argv = [sys.argv[3], *sys.argv[4:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
