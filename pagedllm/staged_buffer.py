"""A host buffer with a device twin at a fixed address: filled on the host (numpy), uploaded by one asynchronous
copy of the used rows. The step inputs (``worker/step_buffers.py``), the grammar masks and the LoRA tiles each stage
their per-step data this way, so a replayed CUDA graph reads it at the same address every step. On CPU the host
buffer is the device buffer and uploads are free."""

from __future__ import annotations

import torch


class StagedBuffer:
    """A 1-D or 2-D host buffer (``.np``, a numpy view to fill) with a device twin (``.device``)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        is_cuda = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=is_cuda)
        self.np = self.host.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device) if is_cuda else self.host

    def upload(self, num_rows: int, first_row: int = 0) -> torch.Tensor:
        """Copy rows ``first_row:num_rows`` to the device (asynchronously); return the first ``num_rows`` there."""
        if self.device is not self.host and first_row < num_rows:
            self.device[first_row:num_rows].copy_(self.host[first_row:num_rows], non_blocking=True)
        return self.device[:num_rows]
