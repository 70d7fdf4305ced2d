"""The host side of grammar masks: one pinned int32 bitmask buffer with a device twin, filled by the grammar backend.

A fill is one batched call into the backend (xgrammar fills the rows on its own threads), and an upload is one
asynchronous copy. The rule of ``step_buffers`` holds: host rows are rewritten only after the sync of
the step whose copies read them.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.staged_buffer import StagedBuffer
from pagedllm.structured_output.backend import bitmask_width
from pagedllm.structured_output.manager import StructuredOutputRequest, fill_bitmasks

# Words of a row read to estimate the share of tokens it allows: 8,192 token ids spread over the vocabulary.
_SAMPLED_WORDS = 256


class MaskStaging:
    """Bitmasks of up to ``max_rows`` grammars, addressed by staging row."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.width = bitmask_width(vocab_size)
        self._buffer = StagedBuffer((max_rows, self.width), torch.int32, device)

    def fill(self, grammars: list[StructuredOutputRequest]) -> None:
        """Staging row i <- the allowed next tokens of ``grammars[i]`` (host only)."""
        fill_bitmasks(grammars, self._buffer.host[: len(grammars)])

    def upload(self, num_rows: int) -> torch.Tensor:
        """Staging rows [0, num_rows) on the device ([num_rows, width] int32), valid until the next upload."""
        return self._buffer.upload(num_rows)

    def allows(self, tokens: list[int]) -> np.ndarray:
        """Whether staging row i allows ``tokens[i]``, for each i (bool)."""
        token_ids = np.asarray(tokens, dtype=np.int64)
        words = self._buffer.np[np.arange(len(tokens)), token_ids >> 5]
        return ((words >> (token_ids & 31)) & 1).astype(bool)

    def allowed_fractions(self, num_rows: int) -> np.ndarray:
        """The share of the vocabulary each of staging rows [0, num_rows) allows, estimated from ``_SAMPLED_WORDS``
        words spread over the row (a full count would cost more than it tells)."""
        words = self._buffer.np[:num_rows, :: max(1, self.width // _SAMPLED_WORDS)]
        return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1).mean(axis=1)
