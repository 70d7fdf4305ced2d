"""Preallocated buffers for a step's model inputs: filled on the host with numpy, copied once each to the device.

Every input of a step (token ids, positions, KV slots, query starts, context lengths, block tables, the rows to
sample) lives in a buffer allocated once at start-up at its maximum size: pinned host memory on CUDA, so each
upload is one asynchronous copy of the used prefix, and a device twin at a fixed address, which is what a
replayed CUDA graph reads. On CPU the host buffer is the device buffer and uploads are free.

Host buffers are rewritten only once the copies that read them have run: after the previous step's one
device->host sync, or (async scheduling, where the host prepares a step while the previous one runs) after an event
recorded behind the previous step's uploads.

Two inputs rarely change from one step to the next and are copied only when they do: the query starts (a run of
decode steps has the same ``0, 1, 2, ...``) and the block tables (a row changes when its request gets a new block, every
``block_size`` tokens, or another request takes the row). Each copy costs ~15 us of host time at batch 1 (measured on
an H200), and the block tables are ``max_num_seqs x max_blocks_per_req`` ids (2.6 MB at 256 x 2560).
"""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.staged_buffer import StagedBuffer


class ShadowedBuffer(StagedBuffer):
    """A small 1-D staged buffer copied only when its used prefix differs from what the device already holds."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(shape, dtype, device)
        self._shadow = self.np.copy()  # what the device holds, on the host
        self._num_shadowed = 0  # rows of the device buffer that equal the shadow

    def upload(self, num_rows: int, first_row: int = 0) -> torch.Tensor:
        if num_rows <= self._num_shadowed and np.array_equal(self.np[:num_rows], self._shadow[:num_rows]):
            return self.device[:num_rows]
        self._shadow[:num_rows] = self.np[:num_rows]
        self._num_shadowed = max(self._num_shadowed, num_rows)
        return super().upload(num_rows)


class StepBuffers:
    """The staged inputs of one step, sized for the largest step the scheduler can make."""

    def __init__(self, max_num_tokens: int, max_num_reqs: int, max_blocks_per_req: int, device: torch.device) -> None:
        self.input_ids = StagedBuffer((max_num_tokens,), torch.int64, device)
        self.positions = StagedBuffer((max_num_tokens,), torch.int64, device)
        self.slot_mapping = StagedBuffer((max_num_tokens,), torch.int64, device)
        self.query_start_loc = ShadowedBuffer((max_num_reqs + 1,), torch.int32, device)
        self.seq_lens = StagedBuffer((max_num_reqs,), torch.int32, device)
        self.block_tables = StagedBuffer((max_num_reqs, max_blocks_per_req), torch.int32, device)
        self.sample_indices = StagedBuffer((max_num_reqs,), torch.int64, device)
        # Async scheduling: where the tokens the previous step is still sampling go, and their rows in its output.
        self.placeholder_indices = StagedBuffer((max_num_reqs,), torch.int64, device)
        self.placeholder_sources = StagedBuffer((max_num_reqs,), torch.int64, device)
        # Which block table (by version) each row holds, and how many of its ids: a request that keeps its row
        # from one step to the next only has its new blocks written (the scheduler's diff, not a rebuild).
        self._row_version: list[int | None] = [None] * max_num_reqs
        self._row_num_blocks = [0] * max_num_reqs
        self._num_current_rows = 0  # block-table rows [0, this) on the device equal the host's

    def upload_block_tables(self, num_rows: int) -> torch.Tensor:
        """The first ``num_rows`` block-table rows on the device, copying only from the first row written since
        the last copy (rows are contiguous, so one copy)."""
        first_row = self._num_current_rows
        self._num_current_rows = max(first_row, num_rows)
        return self.block_tables.upload(num_rows, first_row)

    def write_block_table_row(self, row: int, version: int, block_ids: list[int]) -> None:
        """Make row ``row`` hold ``block_ids``; ``version`` (unique per block table, which only grows under one
        version) tells whether the row already holds a prefix of them."""
        num_written = self._row_num_blocks[row] if self._row_version[row] == version else 0
        if num_written < len(block_ids):
            self.block_tables.np[row, num_written : len(block_ids)] = block_ids[num_written:]
            self._num_current_rows = min(self._num_current_rows, row)
        self._row_version[row] = version
        self._row_num_blocks[row] = len(block_ids)

    def fill_padding(self, num_tokens: int, num_reqs: int, padded_num_reqs: int) -> None:
        """Decode padding for a CUDA graph of ``padded_num_reqs`` rows: padding tokens write no KV slot, padding
        requests have no context (their attention output is 0) and sample nothing that is read."""
        padded_num_tokens = num_tokens + padded_num_reqs - num_reqs
        self.input_ids.np[num_tokens:padded_num_tokens] = 0
        self.positions.np[num_tokens:padded_num_tokens] = 0
        self.slot_mapping.np[num_tokens:padded_num_tokens] = -1
        self.seq_lens.np[num_reqs:padded_num_reqs] = 0
        last_start = self.query_start_loc.np[num_reqs]
        self.query_start_loc.np[num_reqs + 1 : padded_num_reqs + 1] = last_start + np.arange(
            1, padded_num_reqs - num_reqs + 1
        )

    def fill_mixed_padding(self, num_tokens: int, num_reqs: int, padded_num_tokens: int, padded_num_reqs: int) -> None:
        """Padding for a mixed-step graph of ``padded_num_tokens`` tokens and ``padded_num_reqs`` requests: padding
        tokens write no KV slot; the first padding request holds them all and the others none, all with no context
        (the prefill kernel returns at once for a request with no query, and attends to nothing without context).
        With no padding request left, the padding tokens belong to none: their rows are never read."""
        self.input_ids.np[num_tokens:padded_num_tokens] = 0
        self.positions.np[num_tokens:padded_num_tokens] = 0
        self.slot_mapping.np[num_tokens:padded_num_tokens] = -1
        self.seq_lens.np[num_reqs:padded_num_reqs] = 0
        self.query_start_loc.np[num_reqs + 1 : padded_num_reqs + 1] = padded_num_tokens
