"""What a GEMM kernel computes its input from as it loads it, for the fused-input variants of ``skinny_gemm`` and
``quantization/fp8_gemv``: nothing, an RMSNorm (with an optional residual add), or SiLU-and-mul of a fused gate/up
projection's output. The tensors the kernel reads and writes besides x ride along."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputPrologue:
    """The op before the GEMM, done inside it (the defaults: none)."""

    residual: torch.Tensor | None = None  # added to x before the norm
    norm_weight: torch.Tensor | None = None  # set: an RMSNorm
    eps: float = 0.0
    residual_out: torch.Tensor | None = None  # where x + residual (the next residual stream) goes
    is_silu_mul: bool = False

    @property
    def is_norm(self) -> bool:
        return self.norm_weight is not None
