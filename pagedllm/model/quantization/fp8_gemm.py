"""The FP8-weight product ``y = x (W_fp8 * s_w)^T + b`` (weight [N, K] in float8_e4m3fn, one float32 scale per
output channel), on the fastest path the device has:

- decode-sized x on a GPU with FP8 tensor cores (sm89+) with Triton: kernels that stream the FP8 weight, half the
  bytes of bf16 (at small batches a layer is one pass over its weight, so bytes are time). Up to
  ``GEMV_MAX_ROWS`` rows a dot-free GEMV, weight only: x stays in 16 bits, no quantization launch
  (``fp8_gemv``); up to ``TRITON_MAX_ROWS`` a ``tl.dot`` GEMM (``fp8_triton``): up to ``FUSED_QUANT_MAX_ROWS``
  rows with x quantized inside the GEMM (per row and K block: ``w8a8_fused``), above with x quantized per row by
  its own launch (``w8a8``), and for weight-only checkpoints with the FP8 tile widened to x's dtype
  (``weight_only``). On Hopper (sm90), from ``FUSED_QUANT_MAX_ROWS`` to ``TMA_MAX_ROWS`` rows and K a multiple
  of 16, x quantized per row by its own launch and a GEMM streaming both FP8 operands by TMA into wgmma
  (``fp8_tma``, ``w8a8_tma``): it takes precedence over ``w8a8`` and ``_scaled_mm`` in that range.
  ``triton_path`` is the choice;
- larger x on a device with FP8 tensor cores (sm89+): x is quantized to FP8 per token (or with the checkpoint's
  static scale) and ``torch._scaled_mm`` multiplies with row-wise scales (x's [M, 1], the weight's [1, N]);
- anywhere else (CPU, older GPUs, shapes ``_scaled_mm`` refuses): dequantize and multiply in x's dtype. This is
  also the oracle every faster path is tested against.

Activation schemes (``ActivationScheme``): ``dynamic_token`` (a scale per row, from its max), ``dynamic_tensor``
(one scale per call), ``static`` (the checkpoint's ``input_scale``), ``none`` (weight-only FP8: never quantize x).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

from pagedllm.platform import triton_ops_enabled

ActivationScheme = Literal["dynamic_token", "dynamic_tensor", "static", "none"]
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # an all-zero row still gets a finite, non-zero scale
_SCALED_MM_ALIGN = 16  # _scaled_mm wants K and N multiples of 16
# Which Triton kernel serves x of M rows (``triton_path``). Module constants so that a benchmark can compare the
# alternatives in one process (benchmarks/scripts/fp8_microbench.py). Set from the H200 microbenchmark of one
# Llama-3.1-8B layer's four projections (benchmarks/h200/issue16-fp8-weights/call3): M = 1 gemv 65 us (w8a8_fused
# 84, bf16 115); M = 4 and 16 w8a8_fused 84 (gemv 203 at M = 4, w8a8 92-95); M = 64 w8a8 104 (fused 151, bf16 127);
# M = 128 _scaled_mm 132 (w8a8 137, bf16 136).
GEMV_MAX_ROWS = 1  # 1..this many rows: fp8_gemv (at most fp8_gemv.MAX_ROWS, 4; 0 turns it off)
FUSED_QUANT_MAX_ROWS = 16  # up to this many rows (past the GEMV) x is quantized inside the GEMM; 0 turns it off
TRITON_MAX_ROWS = 64  # up to this many: the tl.dot GEMM (at most fp8_triton.MAX_ROWS, 128); above, _scaled_mm
# Past FUSED_QUANT_MAX_ROWS up to this many rows, on sm90 with K % 16 == 0: the TMA + wgmma GEMM (fp8_tma, at most
# its MAX_ROWS, 256), before w8a8 and _scaled_mm; 0 turns it off. From the H200 microbenchmark
# (benchmarks/h200/session27/call3, fp8_microbench.py --tma): its Llama-3.1-8B layer beat both at every M to 256.
TMA_MAX_ROWS = 256
# 1: a one-row projection on the GEMV computes its input itself where the model asks (the RMSNorm before qkv and
# gate_up, SiLU-and-mul before down: ``fp8_gemv.fp8_rms_norm_gemv`` / ``fp8_silu_mul_gemv``), saving those ops'
# launches. Off: on the H200 (benchmarks/h200/session30, Llama-3.1-8B) the fused GEMVs took 95.5 us for qkv + gate_up
# + down against 64.3 for the ops and the plain GEMVs as separate launches, and the batch-1 decode step 3.79 ms
# against 2.84 (each program reloads x, the residual and the norm weight every K step, and the weight stream slows).
FUSE_INPUT_INTO_GEMV = 0
TritonPath = Literal["gemv", "w8a8", "w8a8_fused", "w8a8_tma", "weight_only"]


@functools.cache
def _triton_kernels() -> ModuleType:
    """The Triton GEMM module, imported on first CUDA use so that CPU-only runs never import Triton."""
    from pagedllm.model.quantization import fp8_triton

    return fp8_triton


@functools.cache
def _gemv_kernel() -> ModuleType:
    from pagedllm.model.quantization import fp8_gemv

    return fp8_gemv


@functools.cache
def _tma_kernel() -> ModuleType:
    from pagedllm.model.quantization import fp8_tma

    return fp8_tma


def triton_path(num_rows: int, scheme: ActivationScheme, tma: bool = False) -> TritonPath | None:
    """The Triton kernel for x of ``num_rows`` rows on an sm89+ GPU (module constants above), or None:
    ``_scaled_mm`` or the dequantizing reference. Weight-only schemes never quantize x. ``tma``: the TMA GEMM can
    take the call (sm90, K a multiple of 16)."""
    if num_rows <= 0:
        return None
    if num_rows <= GEMV_MAX_ROWS:
        return "gemv"
    if scheme != "none" and num_rows > FUSED_QUANT_MAX_ROWS and tma and num_rows <= TMA_MAX_ROWS:
        return "w8a8_tma"
    if num_rows > TRITON_MAX_ROWS:
        return None
    if scheme == "none":
        return "weight_only"
    return "w8a8_fused" if num_rows <= FUSED_QUANT_MAX_ROWS else "w8a8"


@functools.cache
def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether ``device`` multiplies FP8 in hardware (Ada sm89, Hopper sm90 and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense weight [N, K] as FP8 with one scale per output channel (its max maps to 448): (fp8 [N, K], [N])."""
    w32 = weight.float()
    scale = (w32.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale[:, None]`` in ``dtype`` (computed in float32)."""
    return (weight.float() * scale.float()[:, None]).to(dtype)


def quantize_activation(x: torch.Tensor, scheme: ActivationScheme,
                        input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as FP8 and its scale as [M, 1] float32 (the torch path; ``fp8_triton`` fuses it on CUDA)."""
    x32 = x.float()
    if scheme == "static":
        assert input_scale is not None
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    elif scheme == "dynamic_token":
        scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    elif scheme == "dynamic_tensor":
        scale = (x32.abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE).reshape(1, 1).expand(x.shape[0], 1)
    else:
        raise ValueError(f"Activation scheme {scheme!r} does not quantize activations")
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.contiguous()


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """The oracle and the CPU path: ``x W_fp8^T`` in x's dtype (FP8 values are exact in 16 bits), then the
    per-channel scale; x is never rounded to FP8."""
    out = F.linear(x, weight.to(x.dtype)) * weight_scale.to(x.dtype)
    return out + bias if bias is not None else out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               scheme: ActivationScheme, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x (weight * weight_scale[:, None])^T + bias`` for x [..., K], weight fp8 [N, K], weight_scale float32 [N];
    a tensor [..., N] in x's dtype, by the fastest path of x's device (module docstring)."""
    x2d = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        out = _cuda_linear(x2d, weight, weight_scale, bias, scheme, input_scale)
    else:
        out = fp8_linear_reference(x2d, weight, weight_scale, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _cuda_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 scheme: ActivationScheme, input_scale: torch.Tensor | None) -> torch.Tensor:
    path = _triton_path_for(x, weight, scheme)
    if path is not None:
        return _triton_linear(path, x, weight, weight_scale, bias, scheme, input_scale)
    if scheme != "none" and _scaled_mm_accepts(x, weight):
        return _scaled_mm_linear(x, weight, weight_scale, bias, scheme, input_scale)
    return fp8_linear_reference(x, weight, weight_scale, bias)


def gemv_fuses_input(x: torch.Tensor, weight: torch.Tensor, scheme: ActivationScheme) -> bool:
    """Whether ``fp8_linear`` on x (one row, [..., K]) runs the GEMV, which can then take the op before it in its
    prologue (``FUSE_INPUT_INTO_GEMV``)."""
    x2d = x.reshape(-1, x.shape[-1])
    return (bool(FUSE_INPUT_INTO_GEMV) and x.is_cuda and x2d.shape[0] == 1
            and _triton_path_for(x2d, weight, scheme) == "gemv")


def fused_input_kernels() -> ModuleType:
    """The GEMV module, whose ``fp8_rms_norm_gemv`` / ``fp8_silu_mul_gemv`` serve ``gemv_fuses_input``'s calls."""
    return _gemv_kernel()


def _triton_path_for(x: torch.Tensor, weight: torch.Tensor, scheme: ActivationScheme) -> TritonPath | None:
    if not (triton_ops_enabled() and has_fp8_tensor_cores(x.device)):  # Triton has no float8e4nv before sm89
        return None
    tma = TMA_MAX_ROWS > 0 and _tma_kernel().has_tma(x.device) and _tma_kernel().accepts(x, weight)
    return triton_path(x.shape[0], scheme, tma) if _triton_kernels().accepts(x, weight) else None


def _triton_linear(path: TritonPath, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, scheme: ActivationScheme,
                   input_scale: torch.Tensor | None) -> torch.Tensor:
    if path == "gemv":
        return _gemv_kernel().fp8_gemv(x, weight, weight_scale, bias)
    if path == "weight_only":
        return _triton_kernels().fp8_weight_only_gemm(x, weight, weight_scale, bias)
    if path == "w8a8_tma":
        return _tma_kernel().fp8_w8a8_tma_gemm(x, weight, weight_scale, bias, scheme, input_scale)
    return _triton_kernels().fp8_w8a8_gemm(x, weight, weight_scale, bias, scheme, input_scale,
                                           fuse_quantization=path == "w8a8_fused")


def _scaled_mm_accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return (has_fp8_tensor_cores(x.device) and k % _SCALED_MM_ALIGN == 0 and n % _SCALED_MM_ALIGN == 0
            and x.shape[0] > 0)


def _scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                      scheme: ActivationScheme, input_scale: torch.Tensor | None) -> torch.Tensor:
    """W8A8 on the FP8 tensor cores: x quantized (one fused Triton launch where Triton runs), then cuBLASLt with
    row-wise scales. Row-wise scaling gives bf16 out; the bias is added in x's dtype afterwards."""
    if triton_ops_enabled():
        x_fp8, x_scale = _triton_kernels().quantize_activation(x, scheme, input_scale)
    else:
        x_fp8, x_scale = quantize_activation(x, scheme, input_scale)
    # weight.t() is the column-major [K, N] operand cuBLASLt wants, without a copy.
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                           out_dtype=torch.bfloat16)
    out = out.to(x.dtype)
    return out + bias if bias is not None else out
