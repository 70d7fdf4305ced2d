"""The experts' computation as two grouped-GEMM Triton launches over all experts (CUDA; Triton's interpreter on CPU
in the tests).

The step's (token, expert) pairs are sorted by expert into row blocks of one expert each (``align.py``); a program
of the grouped GEMM takes one row block and one column tile, reads its expert's weight tile and gathers its rows of
the input by pair id. Two launches per layer:

1. gate and up: ``act = silu(x W_gate^T) * (x W_up^T)`` [pairs, I]. A program holds the gate tile and the up tile of
   the same columns (rows ``n`` and ``I + n`` of ``w13``), so SiLU-and-mul runs in its epilogue and the
   [pairs, 2 * I] product is never written (``fuse_silu_mul=False`` writes it and runs the separate kernel, for
   measurement).
2. down: ``act W_down^T`` times each pair's routing weight [pairs, H]; the top-k rows of a token are then summed
   (one small reduction, deterministic, unlike atomic adds).

No host sync and no shape that depends on the routing: the launch grids are sized for the padded capacity
(``align.padded_capacity``) and programs past the used rows return at once, so a layer runs inside the decode CUDA
graphs. Weights are [E, 2 * I, H] and [E, H, I]: expert parallelism later takes a range of E, tensor parallelism
the same slice of the gate rows, of the up rows and of down's I columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.model.moe.align import ExpertBlocks, align_to_blocks


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    num_pairs, N, K, a_row_stride, b_expert_stride, b_row_stride, c_row_stride, up_row_offset,
    A_ROWS_PER_PAIR: tl.constexpr, FUSE_SILU_MUL: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (row block, column tile): ``c[pair, n] = a[row of pair] . b[expert, n]`` over K (see module doc).

    ``A_ROWS_PER_PAIR``: top_k when ``a`` is the tokens' input (pair p reads row p // top_k), 1 when ``a`` holds
    one row per pair. With ``FUSE_SILU_MUL`` the program also computes rows ``up_row_offset + n`` of ``b`` and stores
    ``silu(gate) * up``.
    """
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    block = tl.program_id(0) // num_n_tiles
    tile_n = tl.program_id(0) % num_n_tiles
    if block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pair_ids = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    is_pair = pair_ids < num_pairs
    expert = tl.load(expert_ids_ptr + block).to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    is_col = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair_ids // A_ROWS_PER_PAIR)[:, None] * a_row_stride + ks[None, :]
    b_ptrs = b_ptr + expert * b_expert_stride + cols[None, :].to(tl.int64) * b_row_stride + ks[:, None]  # [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = ks < K - k0
        a = tl.load(a_ptrs, mask=is_pair[:, None] & in_k[None, :], other=0.0)
        b_mask = in_k[:, None] & is_col[None, :]
        acc = tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, input_precision=DOT_PRECISION)
        if FUSE_SILU_MUL:
            up = tl.load(b_ptrs + up_row_offset * b_row_stride, mask=b_mask, other=0.0)
            acc_up = tl.dot(a, up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    dtype = c_ptr.dtype.element_ty
    if FUSE_SILU_MUL:  # rounded as torch would: gate and up in the activation dtype, then SiLU's output
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        acc = silu * acc_up.to(dtype).to(tl.float32)
    if MUL_ROUTED_WEIGHT:
        acc = acc.to(dtype).to(tl.float32) * tl.load(weights_ptr + pair_ids, mask=is_pair, other=0.0)[:, None]
    c_ptrs = c_ptr + pair_ids[:, None] * c_row_stride + cols[None, :]
    tl.store(c_ptrs, acc.to(dtype), mask=is_pair[:, None] & is_col[None, :])


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch shape of the grouped GEMMs for one step size."""

    block_m: int
    block_n_gate_up: int
    block_n_down: int
    block_k: int
    num_warps: int
    num_stages: int


def choose_tiles(num_pairs: int, num_experts: int) -> TileConfig:
    """Row blocks near the average pairs per expert (padding each expert's run wastes up to a block of rows);
    narrow column tiles for decode-sized steps so that a few experts still spread over all SMs. Untuned guesses:
    see benchmarks/scripts/issue19_moe_run.sh for the measurement."""
    per_expert = max(1, num_pairs // num_experts)
    block_m = min(64, max(16, triton.next_power_of_2(per_expert)))
    if block_m == 16:
        return TileConfig(16, 32, 64, 128, num_warps=4, num_stages=4)
    return TileConfig(block_m, 64, 64, 64, num_warps=4, num_stages=3)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 models get exact float32 products, not TF32


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, blocks: ExpertBlocks, n: int, tiles: TileConfig,
                  block_n: int, weights: torch.Tensor | None, a_rows_per_pair: int, fuse_silu_mul: bool) -> None:
    grid = (blocks.sorted_ids.numel() // blocks.block_m * triton.cdiv(n, block_n),)
    _grouped_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out, blocks.sorted_ids, blocks.expert_ids, blocks.num_padded,
        blocks.num_pairs, n, a.shape[1], a.stride(0), b.stride(0), b.stride(1), out.stride(0), b.shape[1] // 2,
        A_ROWS_PER_PAIR=a_rows_per_pair, FUSE_SILU_MUL=fuse_silu_mul, MUL_ROUTED_WEIGHT=weights is not None,
        BLOCK_M=blocks.block_m, BLOCK_N=block_n, BLOCK_K=tiles.block_k, DOT_PRECISION=dot_precision(a.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def fused_moe(
    x: torch.Tensor,  # [T, H], rows contiguous
    w13: torch.Tensor,  # [E, 2 * I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    fuse_silu_mul: bool = True,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """The same as ``torch_moe.torch_moe`` (up to summation order) in two grouped-GEMM launches: [T, H]."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    intermediate = two_i // 2
    x = x.contiguous()
    tiles = tiles or choose_tiles(num_tokens * top_k, num_experts)
    blocks = align_to_blocks(topk_ids, num_experts, tiles.block_m)
    num_pairs = num_tokens * top_k
    if fuse_silu_mul:
        act = torch.empty(num_pairs, intermediate, dtype=x.dtype, device=x.device)
        _grouped_gemm(x, w13, act, blocks, intermediate, tiles, tiles.block_n_gate_up, None, top_k, True)
    else:
        gate_up = torch.empty(num_pairs, two_i, dtype=x.dtype, device=x.device)
        _grouped_gemm(x, w13, gate_up, blocks, two_i, tiles, tiles.block_n_gate_up, None, top_k, False)
        act = _silu_and_mul(gate_up)
    weighted = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    routing = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _grouped_gemm(act, w2, weighted, blocks, hidden, tiles, tiles.block_n_down, routing, 1, False)
    return weighted.view(num_tokens, top_k, hidden).sum(dim=1)


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    from pagedllm.model.triton_ops import silu_and_mul

    return silu_and_mul(gate_up)
