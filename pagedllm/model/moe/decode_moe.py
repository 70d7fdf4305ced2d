"""The experts of a decode-sized step (a few tokens) in two Triton launches, routing included (CUDA; Triton's
interpreter on CPU in the tests).

At batch 1 a layer's experts are a pass over the k experts' weights a token picked (Qwen3-30B-A3B: 8 x 9.4 MB), so
their time is those bytes over the memory bandwidth plus a fixed cost per launch. The grouped GEMM of
``fused_moe.py`` pays for generality there: ~25 small torch ops route and sort the pairs by expert
(``router.select_experts``, ``align.align_to_blocks``), each expert's one row is padded to a 16-row block, and the
top-k sum is one more launch. Here each (token, slot) pair is its own GEMV and nothing is sorted:

1. gate and up, grid (pair, column block): each program routes its token from the router logits (softmax in float32,
   top-k by repeated argmax, renormalized, rounded as ``select_experts`` does: a few reductions over E values,
   cheaper than a launch), reads its expert's gate and up rows of its columns, and stores ``silu(gate) * up`` [pairs,
   I]; the column block 0 program of each pair also stores the pair's expert id and weight for launch 2.
2. down, grid (token, column block, slot): each program multiplies its pair's activation by its expert's down rows
   and scales it by the routing weight; the last of a token's k slots to arrive (an atomic counter per (token,
   column block), ``model/split_k.py``) sums the k partials in slot order and writes the output [T, H]: the
   top-k sum is fused and deterministic.

Both multiply with ``tl.dot``, the vector as the first of 16 columns (the narrowest MMA tile; the others are zeros,
free while memory is the bound), so that Triton pipelines the weight loads ``num_stages`` deep as in the skinny GEMM.
Shapes depend on the number of tokens alone and nothing is read back to the host: a launch is captured in the
decode CUDA graphs, and a replay routes anew. Rounding follows ``fused_moe``: gate, up and SiLU's output rounded to
the activation dtype, each pair's down product rounded, times its weight, rounded, then summed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm import pdl
from pagedllm.model.moe.fused_moe import dot_precision
from pagedllm.model.split_k import COUNTERS_PER_DEVICE, arrival_counters, sm_count
from pagedllm.pdl import allow_later_kernels, wait_for_earlier_kernels

# Steps of at most this many (token, slot) pairs take this path. H200, one Qwen3-30B-A3B layer's experts
# (benchmarks/h200/issue19-moe/session26): 1 token 27 us against the grouped GEMM's 85, 4 tokens 83 against 151,
# 8 tokens (64 pairs) 138 against 190; 16 tokens not measured.
MAX_PAIRS = 64
_MMA_COLUMNS = tl.constexpr(16)  # tl.dot's narrowest tile: the vector is its first column


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape: output columns per program of each launch, K per loop step, warps and pipeline depth."""

    block_n_gate_up: int  # columns of the activation (each reads a gate row and an up row: twice as many rows)
    block_n_down: int
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


def choose_decode_config(num_pairs: int, hidden: int, intermediate: int, num_sms: int,
                         element_size: int = 2) -> DecodeConfig:
    """The widest blocks that still give each launch about two programs per SM (untuned guesses; the sweep in
    benchmarks/scripts/moe_microbench.py measures the alternatives)."""
    stages = 4 if element_size <= 2 else 3  # float32 tiles take twice the shared memory
    gate_up = _widest_block(num_pairs, intermediate, 2 * num_sms, (32, 16, 8))
    down = _widest_block(num_pairs, hidden, 2 * num_sms, (64, 32, 16))
    return DecodeConfig(gate_up, down, num_stages=stages)


def _widest_block(num_pairs: int, columns: int, wanted_programs: int, widths: tuple[int, ...]) -> int:
    for width in widths:
        if num_pairs * triton.cdiv(columns, width) >= wanted_programs:
            return width
    return widths[-1]


def accepts(num_tokens: int, top_k: int, hidden: int) -> bool:
    """Whether a step of ``num_tokens`` tokens takes the decode path in the model: at most ``MAX_PAIRS`` pairs, and
    few enough arrival counters for the down launch at its narrowest blocks. (``fused_moe_decode`` itself takes
    more pairs, for the benchmarks that place the limit.)"""
    num_pairs = num_tokens * top_k
    return 0 < num_pairs <= MAX_PAIRS and num_tokens * triton.cdiv(hidden, 16) <= COUNTERS_PER_DEVICE


@triton.jit
def _route(logits_row_ptr, num_experts, slot, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
           RENORMALIZE: tl.constexpr):
    """Expert id and float32 weight of a token's top-k slot ``slot``, as ``router.select_experts`` picks them:
    softmax in float32, the k largest in descending order (ties to the lower id), optionally renormalized."""
    offs = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_row_ptr + offs, mask=offs < num_experts, other=-float("inf")).to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, axis=0))
    probs = tl.where(offs < num_experts, exps / tl.sum(exps, axis=0), -1.0)  # -1: never picked
    expert = tl.zeros((), tl.int32)
    weight = tl.zeros((), tl.float32)
    kept = tl.zeros((), tl.float32)
    for j in tl.static_range(TOP_K):
        best, best_id = tl.max(probs, axis=0, return_indices=True, return_indices_tie_break_left=True)
        kept += best
        expert = tl.where(slot == j, best_id, expert)
        weight = tl.where(slot == j, best, weight)
        probs = tl.where(offs == best_id, -1.0, probs)
    if RENORMALIZE:
        weight = weight / kept
    return expert, weight


@triton.jit
def _rows_times_vector(w_ptr, row_offsets, vec_ptr, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``W[row, :K] . vec[:K]`` in float32 for the ``ROWS`` rows starting at ``w_ptr + row_offsets``: one tl.dot
    per K step with ``vec`` as the first column of a [BLOCK_K, 16] operand whose other columns load as zeros."""
    ks = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, _MMA_COLUMNS)
    first_col = cols[None, :] == 0
    w_ptrs = w_ptr + row_offsets[:, None] + ks[None, :]
    v_ptrs = vec_ptr + ks[:, None] + cols[None, :] * 0
    acc = tl.zeros((ROWS, _MMA_COLUMNS), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            v = tl.load(v_ptrs, mask=first_col, other=0.0)
        else:
            in_k = ks < K - k
            w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=first_col & in_k[:, None], other=0.0)
        acc = tl.dot(w, v, acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K
        v_ptrs += BLOCK_K
    return tl.sum(acc, axis=1)  # the zero columns add nothing


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _gate_up_kernel(
    x_ptr, logits_ptr, w13_ptr, act_ptr, ids_ptr, weights_ptr,
    num_experts, intermediate, hidden, x_row_stride, logits_row_stride, w_expert_stride, w_row_stride,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_WEIGHTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (pair, column block): route the pair, then ``act[pair, cols] = silu(x W_gate^T) * (x W_up^T)``."""
    wait_for_earlier_kernels(USE_PDL)
    pair = tl.program_id(0)
    tile_n = tl.program_id(1)
    token = pair // TOP_K
    expert, weight = _route(logits_ptr + token * logits_row_stride, num_experts, pair % TOP_K, TOP_K, BLOCK_E,
                            RENORMALIZE)
    if ROUND_WEIGHTS:  # Qwen3-MoE rounds the weights to the logits' dtype
        weight = _rounded(weight, logits_ptr.dtype.element_ty)
    if tile_n == 0:  # one program per pair hands the routing to the down launch
        tl.store(ids_ptr + pair, expert)
        tl.store(weights_ptr + pair, weight)
    rows = tl.arange(0, 2 * BLOCK_N)
    # Tile row 2c is column c's gate row, 2c + 1 its up row; columns past the end re-read the last (never stored).
    cols = tl.minimum(tile_n * BLOCK_N + rows // 2, intermediate - 1)
    w_rows = (rows % 2) * intermediate + cols
    row_offsets = expert.to(tl.int64) * w_expert_stride + w_rows.to(tl.int64) * w_row_stride
    gate_up = _rows_times_vector(w13_ptr, row_offsets, x_ptr + token.to(tl.int64) * x_row_stride, hidden,
                                 2 * BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    allow_later_kernels(USE_PDL)
    gate, up = tl.split(tl.reshape(gate_up, (BLOCK_N, 2)))
    dtype = act_ptr.dtype.element_ty
    gate = _rounded(gate, dtype)
    act = _rounded(gate / (1.0 + tl.exp(-gate)), dtype) * _rounded(up, dtype)
    out_cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + pair.to(tl.int64) * intermediate + out_cols, act.to(dtype), mask=out_cols < intermediate)


@triton.jit
def _down_kernel(
    act_ptr, w2_ptr, ids_ptr, weights_ptr, partial_ptr, arrivals_ptr, out_ptr,
    hidden, intermediate, w_expert_stride, w_row_stride, out_row_stride,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (token, column block, slot): the slot's weighted down product; the token's last slot to arrive sums
    the k of them in slot order into ``out`` and resets the block's counter."""
    wait_for_earlier_kernels(USE_PDL)
    token = tl.program_id(0)
    tile_n = tl.program_id(1)
    slot = tl.program_id(2)
    pair = token * TOP_K + slot
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_offsets = expert * w_expert_stride + tl.minimum(offs_n, hidden - 1).to(tl.int64) * w_row_stride
    product = _rows_times_vector(w2_ptr, row_offsets, act_ptr + pair.to(tl.int64) * intermediate, intermediate,
                                 BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    allow_later_kernels(USE_PDL)
    dtype = out_ptr.dtype.element_ty
    weighted = _rounded(_rounded(product, dtype) * tl.load(weights_ptr + pair), dtype)
    out_ptrs = out_ptr + token.to(tl.int64) * out_row_stride + offs_n
    if TOP_K == 1:
        tl.store(out_ptrs, weighted.to(dtype), mask=offs_n < hidden)
    else:
        # partials [pairs, column blocks * BLOCK_N]: padded columns, so no masks.
        padded_hidden = tl.num_programs(1) * BLOCK_N
        tl.store(partial_ptr + pair * padded_hidden + offs_n, weighted)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        counter = arrivals_ptr + token * tl.num_programs(1) + tile_n
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == TOP_K - 1:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j in tl.static_range(TOP_K):  # slot order: the same sum whichever slot came last
                total += tl.load(partial_ptr + (token * TOP_K + j) * padded_hidden + offs_n, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(dtype), mask=offs_n < hidden)
            tl.store(counter, 0)  # ready for the next launch (or graph replay)


@dataclass(frozen=True)
class DecodeMoEResult:
    """The experts' output [T, H] and the routing the gate/up launch computed: ids [T, k] (int32) and float32
    weights [T, k] (rounded to the logits' dtype where asked)."""

    output: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def fused_moe_decode(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor, top_k: int,
                     renormalize: bool, round_weights: bool, config: DecodeConfig | None = None) -> torch.Tensor:
    """``torch_moe(x, w13, w2, *select_experts(router_logits, top_k, renormalize, dtype))`` (dtype: the logits'
    when ``round_weights``, else None) for ``x`` [T, H]: [T, H]. Meant for decode-sized steps (``accepts``): each
    pair reads its expert's weights, however many pairs share it."""
    return fused_moe_decode_with_routing(x, w13, w2, router_logits, top_k, renormalize, round_weights,
                                         config).output


def fused_moe_decode_with_routing(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]
    w2: torch.Tensor,  # [E, H, I]
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
    round_weights: bool,
    config: DecodeConfig | None = None,
) -> DecodeMoEResult:
    """``fused_moe_decode`` that also returns the routing it computed (see ``DecodeMoEResult``)."""
    num_tokens, hidden = x.shape
    intermediate = w13.shape[1] // 2
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        raise ValueError("fused_moe_decode needs at least one token")
    x, router_logits = x.contiguous(), router_logits.contiguous()
    config = config or choose_decode_config(num_pairs, hidden, intermediate, sm_count(x.device), x.element_size())
    counters_needed = num_tokens * triton.cdiv(hidden, config.block_n_down)
    if counters_needed > COUNTERS_PER_DEVICE:
        raise ValueError(f"the down launch needs {counters_needed} arrival counters (one per token and column "
                         f"block); there are {COUNTERS_PER_DEVICE}")
    act = torch.empty(num_pairs, intermediate, dtype=x.dtype, device=x.device)
    ids = torch.empty(num_pairs, dtype=torch.int32, device=x.device)
    weights = torch.empty(num_pairs, dtype=torch.float32, device=x.device)
    _launch_gate_up(x, router_logits, w13, act, ids, weights, top_k, renormalize, round_weights, config)
    out = torch.empty_like(x)
    _launch_down(act, w2, ids, weights, out, top_k, config)
    return DecodeMoEResult(out, ids.view(num_tokens, top_k), weights.view(num_tokens, top_k))


def _block_k(config: DecodeConfig, k: int) -> int:
    return min(config.block_k, max(16, triton.next_power_of_2(k)))


def _launch_gate_up(x: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, act: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor, top_k: int, renormalize: bool, round_weights: bool,
                    config: DecodeConfig) -> None:
    num_experts, _, hidden = w13.shape
    intermediate = act.shape[1]
    block_k = _block_k(config, hidden)
    grid = (act.shape[0], triton.cdiv(intermediate, config.block_n_gate_up))
    _gate_up_kernel[grid](
        x, logits, w13, act, ids, weights,
        num_experts, intermediate, hidden, x.stride(0), logits.stride(0), w13.stride(0), w13.stride(1),
        TOP_K=top_k, BLOCK_E=triton.next_power_of_2(num_experts), RENORMALIZE=renormalize,
        ROUND_WEIGHTS=round_weights, BLOCK_N=config.block_n_gate_up, BLOCK_K=block_k, EVEN_K=hidden % block_k == 0,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl.launch_options(x.device),
    )


def _launch_down(act: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
                 top_k: int, config: DecodeConfig) -> None:
    num_tokens, hidden = out.shape
    intermediate = act.shape[1]
    block_k = _block_k(config, intermediate)
    column_blocks = triton.cdiv(hidden, config.block_n_down)
    partials = torch.empty(act.shape[0], column_blocks * config.block_n_down, dtype=torch.float32, device=out.device)
    _down_kernel[(num_tokens, column_blocks, top_k)](
        act, w2, ids, weights, partials, arrival_counters(out.device), out,
        hidden, intermediate, w2.stride(0), w2.stride(1), out.stride(0),
        TOP_K=top_k, BLOCK_N=config.block_n_down, BLOCK_K=block_k, EVEN_K=intermediate % block_k == 0,
        DOT_PRECISION=dot_precision(act.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl.launch_options(out.device),
    )
