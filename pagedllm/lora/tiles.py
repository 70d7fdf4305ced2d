"""A step's tokens grouped by adapter slot into tiles, on the host (numpy): what the Triton kernels of ``punica.py``
read to run one small GEMM per tile of one slot's tokens.

The tokens are sorted by slot (the base model's, slot -1, left out), and each slot's run of sorted positions is cut
into tiles of ``tile_rows(T)`` positions: rows (slot, start, end). A kernel's grid has ``max_tiles(T, num_slots)``
tiles whatever the mapping (a CUDA graph's launch is fixed), so the rows after the real tiles are empty (0, 0, 0).
Kept apart from the kernels so that the slot pool imports no Triton on CPU.
"""

from __future__ import annotations

import numpy as np

# Steps up to this many tokens (decode steps, and the CUDA graphs, which go up to 256 tokens) cut tiles of 16 tokens,
# tl.dot's smallest side: a decode step holds a few tokens per adapter. Larger steps (prefills) cut tiles of 64.
SMALL_STEP_TOKENS = 256
_SMALL_TILE_ROWS, _LARGE_TILE_ROWS = 16, 64


def tile_rows(num_tokens: int) -> int:
    """Tokens per tile in a step of ``num_tokens`` tokens."""
    return _SMALL_TILE_ROWS if num_tokens <= SMALL_STEP_TOKENS else _LARGE_TILE_ROWS


def max_tiles(num_tokens: int, num_slots: int) -> int:
    """The most tiles a step of ``num_tokens`` tokens can have (each slot's run adds at most one partial tile)."""
    return -(-num_tokens // tile_rows(num_tokens)) + min(num_slots, num_tokens)


def max_tiles_of_any_step(max_num_tokens: int, num_slots: int) -> int:
    """The most tiles of any step up to ``max_num_tokens`` tokens: of the largest small step or the largest step."""
    return max(max_tiles(min(max_num_tokens, SMALL_STEP_TOKENS), num_slots), max_tiles(max_num_tokens, num_slots))


def step_tiles(token_slots: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """The step's token indices sorted by slot (slot -1 left out), and its tiles as rows (slot, start, end) of
    positions in that order, padded with empty rows to ``max_tiles(len(token_slots), num_slots)``."""
    block_m = tile_rows(len(token_slots))
    order = np.argsort(token_slots, kind="stable")
    first = int(np.searchsorted(token_slots[order], 0))  # the base model's tokens sort first
    perm = order[first:].astype(np.int32)
    tiles = np.zeros((max_tiles(len(token_slots), num_slots), 3), dtype=np.int32)
    if len(perm):
        real = _tiles_of_runs(token_slots[perm], block_m)
        tiles[: len(real)] = real
    return perm, tiles


def _tiles_of_runs(sorted_slots: np.ndarray, block_m: int) -> np.ndarray:
    """Rows (slot, start, end): each run of equal slots cut into pieces of at most ``block_m`` positions."""
    bounds = np.flatnonzero(np.diff(sorted_slots)) + 1
    run_starts = np.concatenate(([0], bounds))
    run_ends = np.concatenate((bounds, [len(sorted_slots)]))
    tiles_per_run = -(-(run_ends - run_starts) // block_m)
    run_of_tile = np.repeat(np.arange(len(run_starts)), tiles_per_run)
    first_tile_of_run = np.cumsum(tiles_per_run) - tiles_per_run
    starts = run_starts[run_of_tile] + block_m * (np.arange(len(run_of_tile)) - first_tile_of_run[run_of_tile])
    ends = np.minimum(starts + block_m, run_ends[run_of_tile])
    return np.stack([sorted_slots[starts], starts, ends], axis=1)
