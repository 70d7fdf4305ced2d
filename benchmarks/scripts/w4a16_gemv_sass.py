"""The W4A16 GEMV kernel's K loop as ptxas emits it for sm_90, per launch shape: no GPU needed (Triton compiles to
PTX and runs its bundled ptxas for ``cuda:90`` on any machine), so a kernel or Triton change can be checked before
a device call:

    TRITON_INTERPRET= python benchmarks/scripts/w4a16_gemv_sass.py

Per shape it prints the registers a thread, the loop's SASS instructions per weight a thread handles (the kernel
is meant to be bound by instruction issue near ~4 at one row of x: an and-or, a subtract and an FMA per weight,
plus the x, scale and zero work shared by a thread's rows), the most frequent opcodes, and the loop's shared-memory
traffic: with ``stages`` > 1 the pipelined weight tiles (LDGSTS in, LDS out, two barriers) and nothing else. STS
in the loop means Triton re-lays a tensor out through shared memory every step, and a count far above ~5 at one
row that x is loaded and converted per weight row instead of once per thread: either way the layouts of
``_word_offsets``'s docstring no longer line up (Triton 3.9 does the latter, ~10 a weight; 3.6, the device's,
compiles the loop as intended).
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
# (label, constexprs over the default, warps, stages): choose_config's shapes at 1, 2 and 4 rows, then variants.
SHAPES = [
    ("M=1 default", {}, 4, 3),
    ("M=2 default", {"BLOCK_M": 2}, 4, 3),
    ("M=4 default", {"BLOCK_M": 4}, 4, 3),
    ("M=1 no pipeline", {}, 4, 1),
    ("M=1 256 rows", {"BLOCK_N": 256}, 4, 3),
    ("M=1 256 rows, 8 warps", {"BLOCK_N": 256}, 8, 3),
    ("M=1 groups of 32, act-order", {"GROUP_SIZE": 32, "HAS_PERM": True}, 4, 3),
]


def compile_cubin(overrides: dict, num_warps: int, num_stages: int) -> bytes:
    kernel = w4a16_kernel._w4a16_gemv_kernel
    constexprs = {"HAS_PERM": False, "HAS_ZEROS": True, "HAS_BIAS": False, "IS_SPLIT": True, "EVEN_K": True,
                  "GROUP_SIZE": 128, "BLOCK_N": 128, "BLOCK_M": 1, "STAGES": num_stages, **overrides}
    signature = {name: "constexpr" if name in constexprs else _POINTERS.get(name, "i32") for name in kernel.arg_names}
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if name not in constexprs and name not in _UNALIGNED}
    source = ASTSource(kernel, signature, constexprs, divisible)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["cubin"]


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


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90")
    for label, overrides, num_warps, num_stages in SHAPES:
        cubin = compile_cubin(overrides, num_warps, num_stages)
        registers = re.search(r"REG:(\d+)", disassemble(cubin, "-res-usage"))[1]
        opcodes = loop_opcodes(disassemble(cubin, "-sass"))
        weights = overrides.get("BLOCK_N", 128) * w4a16_kernel.TILE_K / (32 * num_warps)  # a thread's, per step
        print(f"{label:30s} regs {registers:>3}  {sum(opcodes.values()) / weights:5.2f} instructions/weight  "
              f"STS {opcodes['STS']}  BAR {opcodes['BAR']}  {dict(opcodes.most_common(6))}")


if __name__ == "__main__":
    main()
