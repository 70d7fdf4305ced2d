"""The dense GEMM of the linear layers: ``F.linear``, or the skinny-GEMM Triton kernel for decode-sized batches on
CUDA (a few rows), which streams the weight at near memory bandwidth where cuBLAS's tiles for large batches do not.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F

from pagedllm.platform import triton_ops_enabled


@functools.cache
def _skinny_gemm() -> ModuleType:
    """The skinny-GEMM kernel module, imported on first CUDA use so that CPU-only runs never import Triton."""
    from pagedllm.model import skinny_gemm

    return skinny_gemm


def skinny_gemm_for(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """The skinny-GEMM module when ``linear(x, weight)`` runs its kernel (a decode-sized x on CUDA), else None.
    Its fused variants (an RMSNorm or SiLU-and-mul in the kernel's prologue) ride on the same choice."""
    if x.is_cuda and triton_ops_enabled() and _skinny_gemm().accepts(x, weight):
        return _skinny_gemm()
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the skinny-GEMM kernel where ``skinny_gemm_for`` says."""
    kernels = skinny_gemm_for(x, weight)
    if kernels is not None:
        return kernels.skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)
