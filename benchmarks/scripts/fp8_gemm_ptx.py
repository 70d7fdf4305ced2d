"""The K loops of the W8A8 FP8 GEMMs as the sm_90 compiler emits them (no GPU needed: Triton compiles to PTX and
runs its bundled ptxas for ``cuda:90`` on any machine), so a kernel change can be checked before a device call:

    TRITON_INTERPRET= python benchmarks/scripts/fp8_gemm_ptx.py

Per launch shape (64-row x, a few others) of ``fp8_triton``'s cp.async GEMM (``X_MODE="fp8"``) and ``fp8_tma``'s
TMA GEMM it prints the shared memory, the loop's MMAs and waits (``skinny_gemm_ptx.loop_report``; ``wgmma`` with
e4m3 operands from shared memory, ``wgmma.wait_group 1``, never 0), its copies (``cp.async`` 16-byte copies and
``cp.async.bulk.tensor`` TMA copies per K step) and the SASS instructions of the loop (fewer = less issue work per
weight byte).
"""

from __future__ import annotations

import collections
import re

import triton
from skinny_gemm_ptx import loop_report  # this folder is on sys.path when a script runs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from w4a16_gemv_sass import disassemble

from pagedllm.model.quantization import fp8_tma, fp8_triton

_POINTERS = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "x_scale_ptr": "*fp32",
             "bias_ptr": "*bf16", "out_ptr": "*bf16", "partial_ptr": "*fp32", "arrivals_ptr": "*i32"}
# (label, module, BLOCK_N, BLOCK_M, BLOCK_K, split, warps, stages)
SHAPES = [
    ("cp.async 128x64 s4 (w8a8 at 64 rows)", "triton", 128, 64, 128, True, 4, 4),
    ("cp.async 128x128 s3 (w8a8 at 128 rows)", "triton", 128, 128, 128, False, 8, 3),
    ("TMA 128x64 s6 (choose_config, 64 rows)", "tma", 128, 64, 128, True, 4, 6),
    ("TMA 128x32 s6 (32 rows)", "tma", 128, 32, 128, True, 4, 6),
    ("TMA 128x128 s6 (128 rows)", "tma", 128, 128, 128, False, 8, 6),
    ("TMA 128x256 s4 (256 rows)", "tma", 128, 256, 128, False, 8, 4),
    ("TMA 128x64 k256 s3", "tma", 128, 64, 256, False, 4, 3),
]


def compile_kernel(module: str, block_n: int, block_m: int, block_k: int, split: bool, warps: int, stages: int):
    """The compiled kernel for sm_90: the launch's specialization (16-divisible sizes and strides but num_rows)."""
    constexprs = {"HAS_BIAS": False, "IS_SPLIT": split, "BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_K": block_k,
                  "USE_PDL": False}
    if module == "tma":
        kernel, constexprs["NUM_STAGES"] = fp8_tma._fp8_tma_gemm_kernel, stages
        types = {"w_desc": f"tensordesc<fp8e4nv[{block_n}, {block_k}]>",
                 "x_desc": f"tensordesc<fp8e4nv[{block_m}, {block_k}]>", **_POINTERS}
    else:
        kernel, types = fp8_triton._fp8_gemm_kernel, _POINTERS
        constexprs.update(X_MODE="fp8", EVEN_K=True, DOT_PRECISION="tf32")
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name] != "constexpr" and name != "num_rows" and not name.endswith("desc")}
    source = ASTSource(kernel, signature, constexprs, divisible)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def copies_per_step(ptx: str) -> dict:
    blocks = re.findall(r"(^\$L__BB0_\d+:.*?)(?=^\$L__BB0_\d+:|\Z)", ptx, re.DOTALL | re.MULTILINE)
    body = max(blocks, key=lambda block: block.count("mma"))
    return {"cp.async": len(re.findall(r"cp\.async\.c[ag]\.shared", body)),
            "tma": body.count("cp.async.bulk.tensor"), "mbarrier waits": body.count("mbarrier.try_wait"),
            "e4m3 wgmma": body.count("e4m3.e4m3")}


def k_loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the shortest backward branch's body holding the FP8 MMAs (``QGMMA``): the K loop, not the
    mbarrier spin loop inside it nor the split-K epilogue's loop."""
    lines = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(t[1], 16), address) for address, text in lines
             if "BRA" in text and (t := re.search(r"0x([0-9a-f]+)", text)) and int(t[1], 16) < address]
    with_mma = [(start, end) for start, end in loops
                if any("QGMMA" in text for address, text in lines if start <= address <= end)]
    start, end = min(with_mma, key=lambda loop: loop[1] - loop[0])
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                               for address, text in lines if start <= address <= end)


def main() -> None:
    for label, module, *shape in SHAPES:
        kernel = compile_kernel(module, *shape)
        sass_ops = k_loop_opcodes(disassemble(kernel.asm["cubin"], "-sass"))
        print(f"{label:40s} shared {kernel.metadata.shared // 1024} KB", loop_report(kernel.asm["ptx"]),
              copies_per_step(kernel.asm["ptx"]), f"SASS loop {sum(sass_ops.values())} instructions,",
              dict(sass_ops.most_common(6)))


if __name__ == "__main__":
    main()
