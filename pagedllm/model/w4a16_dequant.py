"""Packed int4 -> bf16 / fp16 dequantization in registers for the W4A16 tl.dot kernel (``w4a16_kernel.py``), two
weights per instruction through ``tl.inline_asm_elementwise`` (PTX, sm_90), as Marlin does it.

A weight enters the MMA as the exact integer ``q - zero`` (the group scale is applied to the float32 accumulator
once per group segment, by the kernel), in two steps:

- ``tile_slices``: the magic-number trick. With bf16's exponent of 128 (``0x4300``) and a nibble ``q`` OR-ed into
  the low mantissa bits, the half is the float ``128 + q`` exactly (fp16: ``0x6400``, 1024 + q). One ``lop3``
  (and-or) makes two of them at once from a 32-bit register holding a nibble in each 16-bit half. The canonical
  layout keeps a tile's column ``16 i + w`` in nibble ``i`` of word ``w``, and the dot operand pairs consecutive
  columns, i.e. the same nibble of two neighbouring words ``a``, ``b``: one ``prmt`` gathers the low 16 bits of
  both (nibbles 0..3 of each) into one register, another the high 16 bits, and shifting those by 4, 8, 12 reaches
  every nibble. Per 16 weights: 2 prmt, 6 shifts, 8 lop3.
- ``subtract_zero``: ``(bias + q) - (bias + zero)`` by one ``sub.rn.bf16x2`` per two weights, exact (both are
  small integers). (Adding a second dot of ``-(bias + zero)`` with x instead costs as much: ptxas copies that
  operand into fresh registers for every MMA instruction.)

The inline assembly is elementwise (each output element depends on its own input element only), so it is right
whichever two elements Triton hands one asm instance; it is fast when they are the two consecutive columns a
thread holds in the dot operand's layout, which Triton 3.6 does (``benchmarks/scripts/w4a16_gemv_sass.py`` checks
for re-layouts). Under Triton's interpreter inline assembly does not run: ``ASM=False`` computes the same values in
plain Triton (the CPU tests run that, with float32 x, and run the unpacking's PTX through a small emulator).
"""

from __future__ import annotations

import triton
import triton.language as tl


def _slices_asm(magic: str) -> str:
    """PTX for one asm instance: words a ($8), b ($9) -> 8 registers ($0..$7), register i holding (bias + nibble i
    of a, bias + nibble i of b) as two halves."""
    lines = ["{", ".reg .b32 lo, hi, t;", "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for i in range(8):
        source = "lo" if i < 4 else "hi"
        shift = 4 * (i % 4)
        if shift:
            lines.append(f"shr.u32 t, {source}, {shift};")
            source = "t"
        # lop3 0xEA: (source & 0x000F000F) | magic
        lines.append(f"lop3.b32 ${i}, {source}, 0x000F000F, {magic}, 0xEA;")
    return "\n".join([*lines, "}"])


_SLICES_BF16 = tl.constexpr(_slices_asm("0x43004300"))
_SLICES_FP16 = tl.constexpr(_slices_asm("0x64006400"))
_SLICES_CONSTRAINTS = tl.constexpr("=r," * 8 + "r,r")
_EIGHT_BF16 = tl.constexpr((tl.bfloat16,) * 8)
_EIGHT_FP16 = tl.constexpr((tl.float16,) * 8)
_SUB_BF16 = tl.constexpr("sub.rn.bf16x2 $0, $1, $2;")
_SUB_FP16 = tl.constexpr("sub.rn.f16x2 $0, $1, $2;")


@triton.jit
def tile_slices(packed, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """The 8 operands of a canonical tile, ``bias + q`` in DTYPE: [rows, 16] words -> 8 x [rows, 16], slice i
    being the tile's columns ``16 i ...`` (module docstring)."""
    if ASM:
        if DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_SLICES_BF16, _SLICES_CONSTRAINTS, [packed], dtype=_EIGHT_BF16,
                                             is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(_SLICES_FP16, _SLICES_CONSTRAINTS, [packed], dtype=_EIGHT_FP16,
                                             is_pure=True, pack=2)
    else:
        bias: tl.constexpr = 1024 if DTYPE == tl.float16 else 128
        return (((packed & 0xF) + bias).to(DTYPE), (((packed >> 4) & 0xF) + bias).to(DTYPE),
                (((packed >> 8) & 0xF) + bias).to(DTYPE), (((packed >> 12) & 0xF) + bias).to(DTYPE),
                (((packed >> 16) & 0xF) + bias).to(DTYPE), (((packed >> 20) & 0xF) + bias).to(DTYPE),
                (((packed >> 24) & 0xF) + bias).to(DTYPE), (((packed >> 28) & 0xF) + bias).to(DTYPE))


@triton.jit
def biased_zero(zero, DTYPE: tl.constexpr):
    """``bias + zero`` in DTYPE (``zero`` any numeric tensor of small integers), for ``subtract_zero``."""
    bias: tl.constexpr = 1024 if DTYPE == tl.float16 else 128
    return (zero.to(tl.int32) + bias).to(DTYPE)


@triton.jit
def subtract_zero(biased_q, biased_zero, ASM: tl.constexpr):
    """``q - zero`` exactly, in the operands' dtype, from ``bias + q`` and ``bias + zero`` (broadcast)."""
    if ASM:
        asm: tl.constexpr = _SUB_BF16 if biased_q.dtype == tl.bfloat16 else _SUB_FP16
        return tl.inline_asm_elementwise(asm, "=r,r,r", [biased_q, biased_zero], dtype=biased_q.dtype,
                                         is_pure=True, pack=2)
    else:
        return biased_q - biased_zero
