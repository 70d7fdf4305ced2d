"""The W4A16 kernels' K loops (the GEMV and the tl.dot kernel) as ptxas emits them for sm_90, per launch shape: no
GPU needed (Triton compiles to PTX and runs its bundled ptxas for ``cuda:90`` on any machine), so a kernel or
Triton change can be checked before a device call. With the device's Triton (3.6) unpacked at /tmp/tr36site:

    PYTHONPATH=/tmp/tr36site:. TRITON_INTERPRET= python benchmarks/scripts/w4a16_gemv_sass.py

Per shape it prints the registers a thread, the loop's SASS instructions per weight a thread handles per K step
(the number to drive down: an H200 SM issues ~128 instructions a clock against ~37 int4 weights a clock of its
share of HBM, so ~3.5 is the most a kernel streaming at full bandwidth can afford; the GEMV spends ~4.7 at one row
of x, an and-or, a subtract and an FMA per weight plus the x, scale and zero work; the tl.dot kernel's inline-asm
dequantization 1.5, plus loads and MMA), ``cvt``: ``convert_layout`` ops in the TTGIR's K loop (tensors re-laid out
every step; the tl.dot kernel's two are the per-group scale and zero, 128 values each), and the loop's
shared-memory stores and barriers: with ``stages`` > 1 the pipelined tiles (LDGSTS in, LDS out, two barriers), more
STS means a re-layout through shared memory. (Triton 3.9 compiles the GEMV to ~10 a weight, loading x per weight
row; 3.6 compiles it as intended.)
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedllm.model import w4a16_kernel

_POINTERS = {"x_ptr": "*bf16", "perm_ptr": "*i64", "qw_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*u8",
             "bias_ptr": "*bf16", "out_ptr": "*bf16", "partial_ptr": "*fp32", "arrivals_ptr": "*i32"}
_UNALIGNED = ("num_rows", "N", "num_groups")  # the launch's other integers are multiples of 16 on real layers
_COMMON = {"HAS_PERM": False, "HAS_ZEROS": True, "HAS_BIAS": False, "IS_SPLIT": True, "EVEN_K": True,
           "GROUP_SIZE": 128, "BLOCK_N": 128, "BLOCK_M": 1, "USE_PDL": 0}
_GEMV = "_w4a16_gemv_kernel"
_DOT = "_w4a16_gemm_kernel"
_DOT_DEFAULTS = {"BLOCK_M": 16, "ASM": True, "DOT_PRECISION": "tf32"}
# (label, kernel, constexprs over the defaults, warps, stages): gemv_config's shapes at 1, 2 and 4 rows and a
# variant, then the tl.dot kernel (x padded to BLOCK_M rows): dot_config's shapes (64-row blocks, session 29's
# sweep), then the 128-row shapes it used before and other alternatives, with and without the inline-asm
# dequantization.
SHAPES = [
    ("GEMV M=1 default", _GEMV, {}, 4, 1),
    ("GEMV M=2 default", _GEMV, {"BLOCK_M": 2}, 4, 3),
    ("GEMV M=4 default", _GEMV, {"BLOCK_M": 4}, 4, 3),
    ("GEMV M=1 groups of 32, act-order", _GEMV, {"GROUP_SIZE": 32, "HAS_PERM": True}, 4, 1),
    ("dot_config M<=16 asm 64x16 w4 s3", _DOT, {"BLOCK_N": 64}, 4, 3),
    ("dot_config M<=64 asm 64x64 w4 s3", _DOT, {"BLOCK_N": 64, "BLOCK_M": 64}, 4, 3),
    ("dot_config M<=128 asm 64x128 w4 s3", _DOT, {"BLOCK_N": 64, "BLOCK_M": 128}, 4, 3),
    ("dot M<=16 asm 128x16 w4 s3", _DOT, {}, 4, 3),
    ("dot M<=16 plain 128x16 w4 s3", _DOT, {"ASM": False}, 4, 3),
    ("dot M<=16 asm 128x16 w8 s3", _DOT, {}, 8, 3),
    ("dot M<=16 asm 256x16 w4 s2", _DOT, {"BLOCK_N": 256}, 4, 2),
    ("dot M<=16 asm 256x16 w8 s2", _DOT, {"BLOCK_N": 256}, 8, 2),
    ("dot M<=32 asm 128x32 w4 s3", _DOT, {"BLOCK_M": 32}, 4, 3),
    ("dot M<=64 asm 128x64 w8 s3", _DOT, {"BLOCK_M": 64}, 8, 3),
    ("dot M<=64 asm 256x64 w8 s2", _DOT, {"BLOCK_N": 256, "BLOCK_M": 64}, 8, 2),
    ("dot M<=128 asm 128x128 w8 s3", _DOT, {"BLOCK_M": 128}, 8, 3),
    ("dot M<=16 asm groups of 32, act-order", _DOT, {"GROUP_SIZE": 32, "HAS_PERM": True}, 4, 3),
    ("dot M<=16 asm one group, odd K", _DOT, {"GROUP_SIZE": 0, "EVEN_K": False}, 4, 3),
]


def compile_cubin(kernel_name: str, overrides: dict, num_warps: int, num_stages: int):
    """The compiled kernel (``.asm["cubin"]``, ``["ttgir"]``) for sm_90."""
    kernel = getattr(w4a16_kernel, kernel_name)
    extra = {"STAGES": num_stages} if kernel_name == _GEMV else _DOT_DEFAULTS
    constexprs = {**_COMMON, **extra, **overrides}
    signature = {name: "constexpr" if name in constexprs else _POINTERS.get(name, "i32") for name in kernel.arg_names}
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if name not in constexprs and name not in _UNALIGNED}
    source = ASTSource(kernel, signature, constexprs, divisible)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def disassemble(cubin: bytes, *flags: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the longest backward branch's body (the K loop)."""
    lines = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(t[1], 16), address) for address, text in lines
             if "BRA" in text and (t := re.search(r"0x([0-9a-f]+)", text)) and int(t[1], 16) < address]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                               for address, text in lines if start <= address <= end)


def loop_relayouts(ttgir: str) -> int:
    """``convert_layout`` ops inside the K loop (the first ``scf.for``: the lines indented deeper than it, up to
    the next line indented as it) of the TTGIR: tensors re-laid out every step (through shared memory or
    shuffles)."""
    lines = ttgir.splitlines()
    start = next((i for i, line in enumerate(lines) if " scf.for " in line), None)
    if start is None:
        return 0
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return sum("ttg.convert_layout" in line for line in body)


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90; per K step (one 128-column tile), per thread")
    for label, kernel_name, overrides, num_warps, num_stages in SHAPES:
        compiled = compile_cubin(kernel_name, overrides, num_warps, num_stages)
        cubin = compiled.asm["cubin"]
        registers = re.search(r"REG:(\d+)", disassemble(cubin, "-res-usage"))[1]
        opcodes = loop_opcodes(disassemble(cubin, "-sass"))
        weights = overrides.get("BLOCK_N", 128) * w4a16_kernel.TILE_K / (32 * num_warps)  # a thread's, per step
        print(f"{label:38s} regs {registers:>3}  {sum(opcodes.values()) / weights:5.2f} instr/weight  "
              f"cvt {loop_relayouts(compiled.asm['ttgir'])}  STS {opcodes['STS']}  BAR {opcodes['BAR']}  "
              f"{dict(opcodes.most_common(7))}")


if __name__ == "__main__":
    main()
