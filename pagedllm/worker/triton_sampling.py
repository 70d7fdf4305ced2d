"""One Triton kernel that draws the token of every row of a batch: CUDA's replacement for the per-row generators.

The CPU sampler re-seeds a ``torch.Generator`` per random row (one small kernel + ``manual_seed`` each, ~8 us of
host time per row on a GPU). Here one launch serves the whole batch: program ``r`` reads row ``r``'s 63-bit
generator seed from an int64 tensor and draws its noise with Triton's counter-based Philox (``tl.rand(seed,
column)``). So the noise of a row depends only on ``(seed, column)``, never on the batch: the sampler's
randomness rule holds (a row's draw depends only on ``(sampling_seed, number of output tokens)``).

Each row is one exponential race: ``token = argmax(logits / temperature - log E)`` with ``E = -log U``
(Exponential(1)), which picks token ``i`` with probability ``softmax(logits / temperature)_i``. Greedy rows take
the plain argmax in the same pass. The vocabulary is read in blocks of ``BLOCK_SIZE`` with a running max/argmax,
so the logits are read once, in their own dtype (no float32 copy, no ``[B, V]`` noise tensor).

Imported lazily (only for CUDA logits), so that ``import pagedllm`` does not need Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 4096 columns per iteration: ~37 iterations for a 152k vocabulary, 16 float32 values per thread at 8 warps.
BLOCK_SIZE = 4096
NUM_WARPS = 8

# Both clamps keep the noise finite, so that a -inf (banned) logit stays -inf and can never win against a finite
# one: U = 0 would make E = inf, and E = 0 (U rounded to 1, or a log that rounds to 0) would make -log E = +inf,
# and -inf + inf is nan. The same floor as the CPU path's ``clamp_min_(tiny)`` on E.
_FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _race_scores(logits, seed, columns, noise_scale, temperature):
    """The race scores of some columns of a row (float32 logits): the draw is the column of the largest."""
    uniform = tl.maximum(tl.rand(seed, columns), _FLOAT32_TINY)
    exponential = tl.maximum(-tl.log(uniform), _FLOAT32_TINY)
    return logits / temperature - noise_scale * tl.log(exponential)


@triton.jit
def _row_parameters(row, seeds_ptr, greedy_ptr, temperature_ptr, HAS_GREEDY: tl.constexpr,
                    HAS_TEMPERATURE: tl.constexpr):
    """A row's seed, noise scale (0.0 for greedy rows: their noise is multiplied away, so one branch-free loop
    serves both kinds) and temperature."""
    seed = tl.load(seeds_ptr + row)
    noise_scale = 1.0
    if HAS_GREEDY:
        noise_scale = tl.where(tl.load(greedy_ptr + row) != 0, 0.0, 1.0)
    temperature = 1.0
    if HAS_TEMPERATURE:
        temperature = tl.load(temperature_ptr + row)
    return seed, noise_scale, temperature


@triton.jit
def _sample_rows_kernel(
    logits_ptr,
    logits_row_stride,
    seeds_ptr,
    greedy_ptr,
    temperature_ptr,
    out_ptr,
    vocab_size,
    HAS_GREEDY: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row_logits_ptr = logits_ptr + row.to(tl.int64) * logits_row_stride
    seed, noise_scale, temperature = _row_parameters(
        row, seeds_ptr, greedy_ptr, temperature_ptr, HAS_GREEDY, HAS_TEMPERATURE
    )
    best_score = float("-inf")
    best_index = 0
    for start in range(0, vocab_size, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        in_vocab = columns < vocab_size
        logits = tl.load(row_logits_ptr + columns, mask=in_vocab, other=float("-inf")).to(tl.float32)
        scores = _race_scores(logits, seed, columns, noise_scale, temperature)
        block_best, block_index = tl.max(scores, axis=0, return_indices=True)
        # Strictly greater: on ties the earlier column wins (as torch.argmax), and a row of only -inf gives 0.
        is_better = block_best > best_score
        best_index = tl.where(is_better, start + block_index, best_index)
        best_score = tl.where(is_better, block_best, best_score)
    tl.store(out_ptr + row, best_index.to(tl.int64))


# Up to this many rows, the vocabulary of each row is split over many programs (one per block) and the blocks'
# winners merged by a second kernel: one program per row would leave all but a few SMs idle (measured on an H200:
# 0.17 ms for one row of Qwen3's 152k vocabulary, a tenth of a Qwen3-0.6B decode step).
MAX_ROWS_FOR_SPLIT_VOCAB = 64


def sample_rows(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    greedy_mask: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: the exponential race of each row, or its argmax where greedy.

    ``seeds``: [B] int64 generator seeds (ignored on greedy rows); ``greedy_mask``: [B] bool, None = no greedy
    row; ``temperature``: [B] float32 to divide the logits by first, None = the logits are already scaled.
    """
    sampled = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0] <= MAX_ROWS_FOR_SPLIT_VOCAB:
        return _sample_rows_split(logits, seeds, greedy_mask, temperature, sampled)
    _launch(_sample_rows_kernel, lambda rows, columns: (rows,), logits, seeds, greedy_mask, temperature, sampled)
    return sampled


def _sample_rows_split(logits, seeds, greedy_mask, temperature, sampled) -> torch.Tensor:
    """``sample_rows`` with one program per (row, block of columns), then one per row to merge: the same blocks,
    scores and tie rule (earliest block among the best) as the one-program loop, so the same tokens."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return sampled
    num_blocks = triton.cdiv(vocab_size, min(BLOCK_SIZE, triton.next_power_of_2(vocab_size)))
    block_scores = torch.empty(num_rows, num_blocks, dtype=torch.float32, device=logits.device)
    block_indices = torch.empty(num_rows, num_blocks, dtype=torch.int64, device=logits.device)
    _launch(_block_winners_kernel, lambda rows, columns: (rows, columns), logits, seeds, greedy_mask, temperature,
            block_scores, block_indices)
    _merge_block_winners_kernel[(num_rows,)](block_scores, block_indices, sampled, num_blocks,
                                             BLOCKS_PAD=triton.next_power_of_2(num_blocks))
    return sampled


@triton.jit
def _block_winners_kernel(
    logits_ptr,
    logits_row_stride,
    seeds_ptr,
    greedy_ptr,
    temperature_ptr,
    scores_ptr,
    indices_ptr,
    vocab_size,
    HAS_GREEDY: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The best race score of one block of a row's columns, and its column."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    num_blocks = tl.num_programs(1)
    columns = block * BLOCK + tl.arange(0, BLOCK)
    seed, noise_scale, temperature = _row_parameters(
        row, seeds_ptr, greedy_ptr, temperature_ptr, HAS_GREEDY, HAS_TEMPERATURE
    )
    logits = tl.load(logits_ptr + row.to(tl.int64) * logits_row_stride + columns, mask=columns < vocab_size,
                     other=float("-inf")).to(tl.float32)
    scores = _race_scores(logits, seed, columns, noise_scale, temperature)
    block_best, block_index = tl.max(scores, axis=0, return_indices=True)
    tl.store(scores_ptr + row * num_blocks + block, block_best)
    tl.store(indices_ptr + row * num_blocks + block, block * BLOCK + block_index)


@triton.jit
def _merge_block_winners_kernel(block_scores, block_indices, out_ptr, num_blocks, BLOCKS_PAD: tl.constexpr):
    """A row's token: the column of its earliest block among those of the best score (0 if all are -inf, as the
    one-program loop gives)."""
    row = tl.program_id(0)
    blocks = tl.arange(0, BLOCKS_PAD)
    is_block = blocks < num_blocks
    scores = tl.load(block_scores + row * num_blocks + blocks, mask=is_block, other=float("-inf"))
    best = tl.max(scores, axis=0)
    first = tl.min(tl.where(is_block & (scores == best), blocks, BLOCKS_PAD), axis=0)
    index = tl.load(block_indices + row * num_blocks + first)
    tl.store(out_ptr + row, tl.where(best == float("-inf"), 0, index))


def _launch(kernel, grid, logits, seeds, greedy_mask, temperature, *outs) -> None:
    """Run one of this module's kernels over ``logits`` (they take the same arguments); ``grid(rows, column
    blocks)`` gives its launch grid."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    # A small vocabulary gets a block of its own size (the noise of a column does not depend on the block).
    block = min(BLOCK_SIZE, triton.next_power_of_2(vocab_size))
    # Unused pointers still need a tensor; the constexpr flags compile their loads away.
    kernel[grid(num_rows, triton.cdiv(vocab_size, block))](
        logits,
        logits.stride(0),
        seeds,
        greedy_mask if greedy_mask is not None else seeds,
        temperature if temperature is not None else seeds,
        *outs,
        vocab_size,
        HAS_GREEDY=greedy_mask is not None,
        HAS_TEMPERATURE=temperature is not None,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )


@triton.jit
def _race_scores_kernel(
    logits_ptr,
    logits_row_stride,
    seeds_ptr,
    greedy_ptr,
    temperature_ptr,
    out_ptr,
    vocab_size,
    HAS_GREEDY: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = columns < vocab_size
    seed, noise_scale, temperature = _row_parameters(
        row, seeds_ptr, greedy_ptr, temperature_ptr, HAS_GREEDY, HAS_TEMPERATURE
    )
    logits = tl.load(logits_ptr + row.to(tl.int64) * logits_row_stride + columns, mask=in_vocab).to(tl.float32)
    scores = _race_scores(logits, seed, columns, noise_scale, temperature)
    tl.store(out_ptr + row.to(tl.int64) * vocab_size + columns, scores, mask=in_vocab)


def race_scores(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    greedy_mask: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 ``[B, V]`` scores whose row-wise argmax ``sample_rows`` returns (same arguments): the same noise,
    so their order ranks the tokens the way the draw does (for the rows under a grammar: see
    ``worker/grammar_sampling.py``)."""
    scores = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _launch(_race_scores_kernel, lambda rows, columns: (rows, columns), logits, seeds, greedy_mask, temperature,
            scores)
    return scores
