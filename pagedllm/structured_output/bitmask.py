"""The step's token bitmasks, filled on the host for every constrained row at once and uploaded in one copy.

Filling is the costly part of structured outputs (microseconds for most rows, but milliseconds in the states where
xgrammar tries most tokens one by one), so the rows go to the backend's batch API in one call (``fill_bitmasks``:
xgrammar fills them on its own threads). The bitmask lives in one int32 buffer allocated once and
reused every step: pinned on CUDA, so its upload is one asynchronous copy into a device twin at a fixed address.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.structured_output.backend import bitmask_width
from pagedllm.structured_output.manager import StructuredOutputRequest, fill_bitmasks

# Words of a row read to estimate the share of tokens it allows: 8,192 token ids spread over the vocabulary.
_SAMPLED_WORDS = 256


class BitmaskStaging:
    """Host and device buffers for the bitmasks of up to ``max_rows`` constrained rows (grown if a step has more).

    Host buffers are rewritten only at the next ``stage``, after the engine's one device->host sync of the step
    that used them, by which time the copies that read them have finished (the rule of ``worker/step_buffers``).
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.width = bitmask_width(vocab_size)
        self._allocate(max_rows)

    def _allocate(self, max_rows: int) -> None:
        is_cuda = self.device.type == "cuda"
        self.max_rows = max_rows
        self._bitmask_host = torch.zeros((max_rows, self.width), dtype=torch.int32, pin_memory=is_cuda)
        self._rows_host = torch.zeros(max_rows, dtype=torch.int64, pin_memory=is_cuda)
        # On CPU the host buffers are the device buffers: the upload is free.
        self._bitmask_device = self._twin(self._bitmask_host)
        self._rows_device = self._twin(self._rows_host)

    def _twin(self, host: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(host, device=self.device) if self.device.type == "cuda" else host

    def stage(self, grammars: list[StructuredOutputRequest], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the bitmask of ``grammars[i]`` (the grammar of batch row ``rows[i]``) into row i and upload: the
        device tensors (rows [K] int64, bitmask [K, width] int32), valid until the next call."""
        num_rows = len(rows)
        if num_rows > self.max_rows:
            self._allocate(max(num_rows, 2 * self.max_rows))
        bitmask = self._bitmask_host[:num_rows]
        fill_bitmasks(grammars, bitmask)
        self._rows_host[:num_rows] = torch.as_tensor(rows, dtype=torch.int64)
        return self._upload(self._rows_host, self._rows_device, num_rows), self._upload(
            self._bitmask_host, self._bitmask_device, num_rows
        )

    def allowed_fractions(self, num_rows: int) -> np.ndarray:
        """The share of the vocabulary each of the first ``num_rows`` rows of the last ``stage`` allows, estimated
        from ``_SAMPLED_WORDS`` words spread over the row (a full count would cost more than it tells)."""
        words = self._bitmask_host[:num_rows, :: max(1, self.width // _SAMPLED_WORDS)].numpy()
        return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1).mean(axis=1)

    def allows(self, tokens: list[int]) -> np.ndarray:
        """Whether row i of the last ``stage`` allows ``tokens[i]``, for each i (bool [len(tokens)])."""
        token_ids = np.asarray(tokens, dtype=np.int64)
        words = self._bitmask_host[: len(tokens)].numpy()[np.arange(len(tokens)), token_ids >> 5]
        return ((words >> (token_ids & 31)) & 1).astype(bool)

    @staticmethod
    def _upload(host: torch.Tensor, device: torch.Tensor, num_rows: int) -> torch.Tensor:
        if device is not host:
            device[:num_rows].copy_(host[:num_rows], non_blocking=True)
        return device[:num_rows]
