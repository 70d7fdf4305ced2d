"""The skinny GEMM's K loop as the sm_90 compiler emits it, per variant: no GPU needed (Triton compiles to PTX and
runs ptxas for ``cuda:90`` on any machine), so a kernel change can be checked for a broken pipeline before a
device call:

    TRITON_INTERPRET= python benchmarks/scripts/skinny_gemm_ptx.py

Per variant it prints what the loop body holds: MMAs (``wgmma`` from shared memory for 64-row tiles, ``mma.sync``
from registers for 32-row ones), what each step waits for (``wgmma.wait_group 0`` = its own MMA; ``cp.async.
wait_group N`` = all but the N newest copies), barriers, and shared-memory or global traffic outside the pipelined
copies. The plain kernel's loop is the reference: 8 wgmma, ``wait_group 1``, 2 barriers, nothing else.
"""

from __future__ import annotations

import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedllm.model import skinny_gemm

_POINTERS = ["x_ptr", "w_ptr", "bias_ptr", "out_ptr", "residual_ptr", "norm_weight_ptr", "residual_out_ptr"]
_INTS = ["num_rows", "N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_om", "stride_rm"]
VARIANTS = {  # name -> (constexprs over the plain qkv config, pipeline stages)
    "plain, 64 rows (Qwen3 qkv)": ({}, 6),
    "norm + residual, 64 rows": ({"NORM_INPUT": True, "HAS_RESIDUAL": True}, 6),
    "silu, 64 rows (Llama down)": ({"SILU_MUL_INPUT": True}, 4),
    "plain, 32 rows split (Qwen3 down)": ({"IS_SPLIT": True, "BLOCK_N": 32}, 4),
    "silu, 32 rows split": ({"IS_SPLIT": True, "BLOCK_N": 32, "SILU_MUL_INPUT": True}, 4),
    "norm after, 32 rows split (Qwen3 o)": ({"IS_SPLIT": True, "BLOCK_N": 32, "NORM_OUTPUT": True}, 4),
}


def compile_ptx(overrides: dict, num_stages: int) -> str:
    kernel = skinny_gemm._skinny_gemm_kernel
    types = {**dict.fromkeys(_POINTERS, "*bf16"), **dict.fromkeys(_INTS, "i32"),
             "partial_ptr": "*fp32", "arrivals_ptr": "*i32", "done_ptr": "*i32", "eps": "fp32"}
    constexprs = {"HAS_BIAS": False, "IS_SPLIT": False, "EVEN_K": True, "BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 128,
                  "DOT_PRECISION": "tf32", "NORM_INPUT": False, "HAS_RESIDUAL": False, "SILU_MUL_INPUT": False,
                  "NORM_OUTPUT": False, "NORM_BLOCK": 1024, "USE_PDL": False, **overrides}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    # The launch's specialization: pointers and the sizes/strides of real layers are multiples of 16.
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if name in types and name not in constexprs and name not in ("num_rows", "eps")}
    source = ASTSource(kernel, signature, constexprs, divisible)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_stages": num_stages}).asm["ptx"]


def loop_report(ptx: str) -> dict:
    blocks = re.findall(r"(^\$L__BB0_\d+:.*?)(?=^\$L__BB0_\d+:|\Z)", ptx, re.S | re.M)
    body = max(blocks, key=lambda block: block.count("mma"))  # the K loop holds the MMAs
    return {
        "wgmma": body.count("wgmma.mma_async"), "mma.sync": body.count("mma.sync"),
        "waits": [" ".join(wait.split()) for wait in
                  re.findall(r"(?:wgmma|cp\.async)\.wait_group(?:\.sync\.aligned)?\s+\d+", body)],
        "barriers": body.count("bar.sync"), "ld.global": body.count("ld.global"),
        "st.shared": body.count("st.shared"), "ld.shared": body.count("ld.shared"),
    }


def main() -> None:
    for name, (overrides, num_stages) in VARIANTS.items():
        print(f"{name:36s}", loop_report(compile_ptx(overrides, num_stages)))


if __name__ == "__main__":
    main()
