"""The W4A16 Triton kernels (``model/w4a16_kernel.py``: the GEMV kernel for a few rows of x, the tl.dot GEMM and
the dequantize kernel) against the torch oracle of ``quantization/int4.py`` (dequantize to x's dtype, then
``F.linear``).

Without CUDA the kernels run in Triton's interpreter on small float32 CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA they also run compiled in bf16/fp16 on Llama-3.1-8B's shapes, decode (split-K) and
prefill sizes, eagerly and replayed from a CUDA graph.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

w4a16 = pytest.importorskip("pagedllm.model.w4a16_kernel")
w4a16_dequant = pytest.importorskip("pagedllm.model.w4a16_dequant")

import triton

from pagedllm.model.quantization.int4 import Int4Checkpoint, Int4Weight, dequantize, to_canonical, torch_linear
from pagedllm.model.w4a16_kernel import (
    GEMV_MAX_ROWS,
    W4A16Config,
    choose_config,
    dequantize_int4,
    dot_config,
    w4a16_linear,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]
# ||out - ref|| / ||ref|| against the oracle: the dequantized weights are identical, the sums differ in order (and
# the oracle's cuBLAS rounds its own way in half precision).
RELATIVE_ERROR = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_weight(n: int, k: int, group_size: int, has_zeros: bool, act_order: bool, seed: int,
                  scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """A random checkpoint in canonical form on DEVICE (act-order: a shuffled g_idx with full groups); drawn and
    repacked there, so the GPU tests' Llama-sized weights take no CPU time."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 16, (n, k), generator=generator, device=DEVICE)
    scales = (0.5 + torch.rand(n, groups, generator=generator, device=DEVICE)) / (4 * k**0.5)
    zeros = torch.randint(0, 16, (n, groups), generator=generator, device=DEVICE) if has_zeros else None
    g_idx = None
    if act_order:
        width = k if group_size == -1 else group_size
        g_idx = (torch.arange(k, device=DEVICE) // width)[torch.randperm(k, generator=generator, device=DEVICE)]
    return to_canonical(Int4Checkpoint(q, scales, zeros, g_idx, group_size), scale_dtype, "test")


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    error = (out.double() - expected.double()).norm() / expected.double().norm()
    assert error < RELATIVE_ERROR[dtype], f"relative error {error:.2e}"


def oracle(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    # In float64 from the same rounded dequantized weight the kernel uses.
    w = dequantize(weight, x.dtype).double()
    xs = x.double() if weight.perm is None else x.double().index_select(-1, weight.perm)
    return F.linear(xs, w, None if bias is None else bias.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 3, 16, 37])
@pytest.mark.parametrize(
    ("n", "k", "group_size", "has_zeros", "act_order", "has_bias"),
    [(72, 96, 32, True, False, True),  # K = 3 groups of 32: tiles span several groups
     (136, 192, 64, False, True, False),  # odd number of groups, act-order, symmetric
     (64, 200, -1, True, False, False),  # one group, K not a multiple of the K tile
     (96, 384, 128, True, True, True)],
)
def test_matches_oracle(dtype, num_rows, n, k, group_size, has_zeros, act_order, has_bias) -> None:
    weight = random_weight(n, k, group_size, has_zeros, act_order, seed=n + k + num_rows)
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if has_bias else None
    expected = oracle(x, weight, bias)
    assert_close(w4a16_linear(x, weight, bias), expected, dtype)
    assert_close(w4a16_linear(x, weight, bias, dequant_min_rows=1), expected, dtype)  # dequantize + F.linear


@pytest.mark.parametrize(
    "config",
    [W4A16Config(64, 16, split_k=3), W4A16Config(32, 16, split_k=2), W4A16Config(64, 32, split_k=4),
     W4A16Config(128, 64, num_warps=8, num_stages=3)],
)
def test_configs_split_k_and_tiles(config: W4A16Config) -> None:
    dtype = DTYPES[0]
    weight = random_weight(100, 416, 32, True, True, seed=1)  # 3.25 tiles: the last slice is short and padded
    x = torch.randn(5, 416, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    assert_close(w4a16_linear(x, weight, None, config=config), oracle(x, weight, None), dtype)
    # Split launches leave their counters at zero: the next launch is right too.
    assert_close(w4a16_linear(x, weight, None, config=config), oracle(x, weight, None), dtype)


@pytest.mark.parametrize(
    "config",
    [W4A16Config(64, 4, split_k=3, gemv=True), W4A16Config(32, 4, split_k=2, num_stages=3, gemv=True),
     W4A16Config(128, 4, num_warps=8, num_stages=2, gemv=True)],
)
def test_gemv_configs(config: W4A16Config) -> None:
    dtype = DTYPES[0]
    weight = random_weight(100, 416, 32, True, True, seed=1)  # 3.25 tiles: the last slice is short and padded
    x = torch.randn(3, 832, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)[:, :416]  # strided rows
    bias = torch.randn(100, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    assert_close(w4a16_linear(x, weight, bias, config=config), oracle(x, weight, bias), dtype)
    assert_close(w4a16_linear(x, weight, bias, config=config), oracle(x, weight, bias), dtype)  # counters reset


def _picker(rng: torch.Generator):
    """A function drawing one of its options with ``rng``."""
    return lambda options: options[int(torch.randint(len(options), (1,), generator=rng))]


def _random_group_and_k(rng: torch.Generator, pick, max_k: int) -> tuple[int, int]:
    """A group size (32, 64, 128, or -1: one group) and a K up to ``max_k`` that it divides (any multiple of 8 for
    one group)."""
    group_size = pick([32, 64, 128, -1])
    unit = 8 if group_size == -1 else group_size
    return group_size, unit * int(torch.randint(1, max_k // unit + 1, (1,), generator=rng))


def random_gemv_cases(count: int, seed: int) -> list[tuple]:
    """(n, k, group_size, has_zeros, act_order, has_bias, num_rows, block_n, split_k) drawn at random: K any
    multiple of 8 that the group size divides (one group: K odd in tiles, or shorter than one), N not a multiple of
    the row block, x's rows 1..4 (the kernel's tested range, whatever GEMV_MAX_ROWS is)."""
    rng = torch.Generator().manual_seed(seed)
    pick = _picker(rng)
    cases = []
    for _ in range(count):
        group_size, k = _random_group_and_k(rng, pick, 512)
        n = int(torch.randint(1, 100, (1,), generator=rng))
        cases.append((n, k, group_size, bool(pick([0, 1])), bool(pick([0, 1])), bool(pick([0, 1])),
                      int(torch.randint(1, 5, (1,), generator=rng)), pick([16, 32, 64]),
                      pick([1, 2, 3])))
    return cases


@pytest.mark.parametrize(("n", "k", "group_size", "has_zeros", "act_order", "has_bias", "num_rows", "block_n",
                          "split_k"), random_gemv_cases(12, seed=16))
def test_gemv_random_shapes(n, k, group_size, has_zeros, act_order, has_bias, num_rows, block_n, split_k) -> None:
    dtype = DTYPES[0]
    weight = random_weight(n, k, group_size, has_zeros, act_order, seed=n * k)
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if has_bias else None
    config = W4A16Config(block_n, triton.next_power_of_2(num_rows), split_k, gemv=True)
    assert_close(w4a16_linear(x, weight, bias, config=config), oracle(x, weight, bias), dtype)


def random_dot_cases(count: int, seed: int, max_rows: int) -> list[tuple]:
    """(n, k, group_size, has_zeros, act_order, has_bias, num_rows, config) for the tl.dot kernel, drawn at
    random: K any multiple of 8 that the group size divides, N not a multiple of the row block, 1..max_rows rows of
    x, row blocks of 64 / 128 with 4 or 8 warps, K split or not."""
    rng = torch.Generator().manual_seed(seed)
    pick = _picker(rng)
    cases = []
    for _ in range(count):
        group_size, k = _random_group_and_k(rng, pick, 640)
        num_rows = int(torch.randint(1, max_rows + 1, (1,), generator=rng))
        block_m = min(128, max(16, triton.next_power_of_2(num_rows)))
        config = W4A16Config(pick([64, 128]), block_m, pick([1, 2, 3]), num_warps=pick([4, 8]), num_stages=pick([2, 3]))
        cases.append((int(torch.randint(1, 300, (1,), generator=rng)), k, group_size, bool(pick([0, 1])),
                      bool(pick([0, 1])), bool(pick([0, 1])), num_rows, config))
    return cases


DOT_CASES = random_dot_cases(8, seed=17, max_rows=256) if DEVICE == "cuda" else random_dot_cases(6, 17, 20)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "group_size", "has_zeros", "act_order", "has_bias", "num_rows", "config"),
                         DOT_CASES)
def test_dot_random_shapes(dtype, n, k, group_size, has_zeros, act_order, has_bias, num_rows, config) -> None:
    """The tl.dot kernel (inline-asm dequantization on CUDA, its plain-Triton stand-in in the interpreter)."""
    weight = random_weight(n, k, group_size, has_zeros, act_order, seed=n * k + num_rows)
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if has_bias else None
    expected = oracle(x, weight, bias)
    assert_close(w4a16_linear(x, weight, bias, config=config, dequant_min_rows=1 << 30), expected, dtype)
    assert_close(torch_linear(x, weight, bias), expected, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 16, 64, 200])
def test_asm_dequantization_equals_plain_triton(dtype, num_rows: int) -> None:
    """The inline assembly computes the operands of its plain-Triton stand-in (the exact integers q - zero), so
    the outputs agree to the last bits of the float32 sums."""
    weight = random_weight(1000, 1024, 64, True, True, seed=num_rows)
    x = torch.randn(num_rows, 1024, device=DEVICE, dtype=dtype)
    config = dot_config(num_rows, 1000, 1024, 132)
    plain = w4a16_linear(x, weight, config=dataclasses.replace(config, asm_dequant=False), dequant_min_rows=1 << 30)
    asm = w4a16_linear(x, weight, config=config, dequant_min_rows=1 << 30)
    error = (asm.double() - plain.double()).norm() / plain.double().norm()
    assert error < 1e-3, f"relative difference {error:.2e}"


@pytest.mark.parametrize("num_rows", sorted({1, max(1, GEMV_MAX_ROWS), GEMV_MAX_ROWS + 1}))
def test_default_dispatch_around_the_gemv_switch(num_rows: int) -> None:
    config = choose_config(num_rows, 4096, 4096, 132)
    assert config.gemv == (num_rows <= GEMV_MAX_ROWS) and config.block_m >= num_rows
    dtype = DTYPES[0]
    weight = random_weight(40, 256, 64, True, True, seed=7)
    x = torch.randn(num_rows, 256, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
    assert_close(w4a16_linear(x, weight), oracle(x, weight, None), dtype)


def run_ptx(text: str, registers: dict[str, int]) -> dict[str, int]:
    """A few 32-bit PTX instructions (prmt.b32, shr.u32, lop3.b32), enough for ``w4a16_dequant``'s unpacking."""
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        opcode, operands = line.split(None, 1)
        destination, *sources = (operand.strip() for operand in operands.split(","))
        a, b, *rest = (registers[s] if s in registers else int(s, 0) for s in sources)
        if opcode == "prmt.b32":  # byte j of the result: byte (rest[0] >> 4 j) & 7 of b:a
            pool = (a | b << 32).to_bytes(8, "little")
            registers[destination] = int.from_bytes(bytes(pool[(rest[0] >> 4 * j) & 7] for j in range(4)), "little")
        elif opcode == "shr.u32":
            registers[destination] = a >> b
        elif opcode == "lop3.b32":  # bit i: bit (a_i b_i c_i) of the lookup table
            c, table = rest
            registers[destination] = sum(
                (table >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1)) & 1) << i for i in range(32))
        else:
            raise AssertionError(f"unexpected PTX: {line}")
    return registers


@pytest.mark.parametrize(("asm", "dtype", "bias"), [(w4a16_dequant._SLICES_BF16, torch.bfloat16, 128),
                                                    (w4a16_dequant._SLICES_FP16, torch.float16, 1024)])
def test_inline_asm_unpacking_by_emulation(asm, dtype, bias) -> None:
    """The PTX of ``tile_slices`` (which only runs on a GPU), emulated: register i holds ``bias + nibble i`` of
    word a in its low half and of word b in its high half, as halves of ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    for a, b in torch.randint(0, 1 << 32, (20, 2), generator=generator, dtype=torch.int64).tolist():
        registers = run_ptx(asm.value, {"$8": a, "$9": b})
        for i in range(8):
            halves = torch.tensor([registers[f"${i}"]], dtype=torch.int64).to(torch.int32).view(dtype)
            expected = [bias + (a >> 4 * i & 0xF), bias + (b >> 4 * i & 0xF)]
            assert halves.tolist() == expected


def test_gemv_rejects_more_rows_than_its_block() -> None:
    weight = random_weight(16, 128, 128, False, False, seed=9)
    with pytest.raises(ValueError, match="at most block_m"):
        w4a16_linear(torch.randn(3, 128).to(DEVICE, DTYPES[0]), weight, config=W4A16Config(16, 2, gemv=True))


def test_dequantize_kernel_is_exact() -> None:
    for group_size, has_zeros in ((32, True), (128, False), (-1, True)):
        weight = random_weight(70, 256, group_size, has_zeros, False, seed=3)
        dtype = DTYPES[0]
        assert torch.equal(dequantize_int4(weight, dtype), dequantize(weight, dtype))


def test_leading_dims_and_empty_input() -> None:
    weight = random_weight(64, 128, 64, True, False, seed=4)
    x = torch.randn(2, 3, 128).to(DEVICE, DTYPES[0])
    assert w4a16_linear(x, weight).shape == (2, 3, 64)
    assert w4a16_linear(x[:0], weight).shape == (0, 3, 64)


# (N, K) of Llama-3.1-8B's qkv, o, gate_up and down projections.
LLAMA_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@needs_cuda
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 16, 64, 200, 512])
@pytest.mark.parametrize(("n", "k"), LLAMA_8B_SHAPES)
def test_llama_shapes_on_gpu(num_rows: int, n: int, k: int) -> None:
    weight = random_weight(n, k, 128, num_rows != 2, num_rows in (3, 4), seed=num_rows)
    x = torch.randn(num_rows, k, device=DEVICE, dtype=torch.bfloat16)
    assert_close(w4a16_linear(x, weight), oracle(x, weight, None), torch.bfloat16)
    assert torch.allclose(torch_linear(x, weight, None).float(), oracle(x, weight, None).float(), rtol=0.05,
                          atol=0.05 * oracle(x, weight, None).abs().max().item())


@needs_cuda
def test_cuda_graph_replay() -> None:
    weight = random_weight(4096, 4096, 128, True, False, seed=5)
    x = torch.randn(3, 4096, device=DEVICE, dtype=torch.bfloat16)
    w4a16_linear(x, weight)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_linear(x, weight)
    for seed in range(3):
        x.copy_(torch.randn(3, 4096, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        assert_close(out, oracle(x, weight, None), torch.bfloat16)


@pytest.mark.parametrize("num_rows", [1, 5, 16, 70])
@pytest.mark.parametrize("config", [None, W4A16Config(64, 4, split_k=2, num_stages=3, gemv=True)],
                         ids=["dot_config", "gemv"])
def test_act_order_x_permuted_first_or_in_the_kernel(num_rows: int, config: W4A16Config | None) -> None:
    """With act-order, x permuted by torch before the kernel gives the sums the kernel's own gather gives: the same
    products in the same order, so the outputs are equal, and equal the oracle."""
    if config is not None and config.gemv and num_rows > config.block_m:
        pytest.skip("the GEMV takes at most block_m rows")
    dtype = DTYPES[0]
    weight = random_weight(96, 384, 64, True, True, seed=num_rows)
    x = torch.randn(num_rows, 384, generator=torch.Generator().manual_seed(num_rows)).to(DEVICE, dtype)
    in_kernel = w4a16_linear(x, weight, config=config, dequant_min_rows=1 << 30, permute_x_first=False)
    first = w4a16_linear(x, weight, config=config, dequant_min_rows=1 << 30, permute_x_first=True)
    assert torch.equal(in_kernel, first)
    assert_close(first, oracle(x, weight, None), dtype)
