"""Fused Triton kernels for the elementwise parts of a decoder layer (CUDA only).

In eager PyTorch, RMSNorm with its residual add, rotary (with Qwen3's per-head q/k norm) and SiLU-and-mul cost
~40 tiny kernels per layer, which dominates a small-batch decode step even inside a CUDA graph. Here each is one
launch: ``rms_norm``, ``fused_add_rms_norm``, ``rotary_qk`` (q and k together) and ``silu_and_mul``. In a decode
step ``rotary_qk_store_kv`` also writes the rotated k and v into the paged KV cache (one launch instead of rotary
plus the attention backend's store; quantized for an FP8 cache, as that store would). Every kernel here can launch
with PDL (``pagedllm/pdl.py``, on by default on Hopper and newer).

Imported lazily by ``layers.py`` only when the activations are on CUDA, so ``import pagedllm`` and CPU inference
never compile Triton. With ``TRITON_INTERPRET=1`` set before this module is imported, the kernels also run on
CPU tensors in Triton's interpreter (that is how the tests check them without a GPU).

Numerics follow the torch path of ``layers.py``: arithmetic in float32, but every value torch would round to the
activation dtype on the way (the residual sum, the normalized row before the weight, the gathered cos/sin, the
SiLU before the multiply) is rounded here too, so bf16 results differ from torch's by at most a rounding step.

Every op is out of place (``rotary_qk_store_kv`` writes the KV cache, as the backend's store would) and returns
fresh contiguous tensors (inputs are never written), allocates nothing
data-dependent and never syncs with the host, so all of them can be captured in a CUDA graph. Inputs may be
strided views along the leading dimensions (q and k are slices of the fused qkv projection), but the last
dimension must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm import pdl
from pagedllm.attention.triton_fp8 import fp8_kernel_args, quantize_fp8
from pagedllm.pdl import wait_for_earlier_kernels


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_out_ptr,
    x_row_stride, residual_row_stride, hidden_size, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One program per row: optionally ``x += residual`` (stored to ``sum_out``), then RMS-normalize times weight."""
    wait_for_earlier_kernels(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # torch adds in the activation dtype: round the sum before normalizing it, and that sum is the new residual.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(sum_out_ptr.dtype.element_ty)
        tl.store(sum_out_ptr + row * hidden_size + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden_size + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden_size + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(
    x_ptr, x_head_stride, out_ptr, out_head_stride, num_stored_heads, norm_weight_ptr, cos, sin, num_heads, eps,
    out_scale, DTYPE: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    HAS_NORM: tl.constexpr, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    """Rotate (and first RMS-normalize, with HAS_NORM) all heads of one token; rows = heads, columns = half dims.
    Heads past ``num_stored_heads`` are computed but not stored (0: a padding token's K, kept out of the cache).
    QUANTIZE: the rotated values (rounded to DTYPE, as the torch path holds them) are divided by ``out_scale`` and
    saturated for an FP8 cache."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (cols < HALF)
    first = x_ptr + heads * x_head_stride + cols
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # Qwen3's q_norm / k_norm over each head, rounded where the torch RMSNorm rounds
        sum_squares = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        rstd = tl.rsqrt(sum_squares / (2 * HALF) + eps)[:, None]
        w1 = tl.load(norm_weight_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(norm_weight_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd).to(DTYPE).to(tl.float32) * w1).to(DTYPE).to(tl.float32)
        x2 = ((x2 * rstd).to(DTYPE).to(tl.float32) * w2).to(DTYPE).to(tl.float32)
    out = out_ptr + heads * out_head_stride + cols
    store_mask = mask & (heads < num_stored_heads)
    out_dtype = out_ptr.dtype.element_ty
    first_half = (x1 * cos - x2 * sin).to(DTYPE)
    second_half = (x2 * cos + x1 * sin).to(DTYPE)
    if QUANTIZE:
        first_half = quantize_fp8(first_half, out_scale, FP8_MAX)
        second_half = quantize_fp8(second_half, out_scale, FP8_MAX)
    tl.store(out, first_half.to(out_dtype), mask=store_mask)
    tl.store(out + HALF, second_half.to(out_dtype), mask=store_mask)


@triton.jit
def _copy_heads(x_ptr, x_head_stride, out_ptr, out_head_stride, num_stored_heads, out_scale,
                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, QUANTIZE: tl.constexpr,
                FP8_MAX: tl.constexpr):
    """Copy the first ``num_stored_heads`` heads of one token (V into the cache, quantized for an FP8 one), in the
    two halves rotary uses."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_stored_heads) & (cols < HALF)
    for half in tl.static_range(2):
        x = tl.load(x_ptr + heads * x_head_stride + half * HALF + cols, mask=mask, other=0.0)
        if QUANTIZE:
            x = quantize_fp8(x, out_scale, FP8_MAX)
        tl.store(out_ptr + heads * out_head_stride + half * HALF + cols, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_qk_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, v_out_ptr, slot_mapping_ptr, positions_ptr, cos_ptr, sin_ptr,
    q_norm_ptr, k_norm_ptr, k_scale_ptr, v_scale_ptr,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride,
    kv_out_token_stride, kv_out_head_stride, cache_row_stride, num_slots,
    num_q_heads, num_k_heads, eps,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
    HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per token: gather its cos/sin row once, then rotate all its q heads and all its k heads.

    STORE_KV: the rotated k and the untouched v go straight to the token's KV cache slot (``k_out``/``v_out`` are
    the cache's slot-indexed views), and a token whose slot is negative (padding) or missing stores nothing.
    Otherwise k goes to ``k_out`` [T, Hkv, D] and v is not read. IS_FP8 (with STORE_KV): the cache is FP8, k and v
    are stored divided by their scales.
    """
    wait_for_earlier_kernels(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    # The torch path casts the float32 cos/sin to the activation dtype before rotating: round them the same way.
    dtype = q_out_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + position * cache_row_stride + cols, mask=cols < HALF, other=0.0)
    sin = tl.load(sin_ptr + position * cache_row_stride + cols, mask=cols < HALF, other=0.0)
    cos = cos.to(dtype).to(tl.float32)
    sin = sin.to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + token * q_token_stride, q_head_stride, q_out_ptr + token * num_q_heads * 2 * HALF,
                  2 * HALF, num_q_heads, q_norm_ptr, cos, sin, num_q_heads, eps,
                  1.0, dtype, HALF, BLOCK_HALF, BLOCK_Q_HEADS, HAS_NORM, False, FP8_MAX)
    num_stored_heads = num_k_heads
    kv_row = token
    k_scale = 1.0
    v_scale = 1.0
    if IS_FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    if STORE_KV:
        slot = tl.load(slot_mapping_ptr + token, mask=token < num_slots, other=-1).to(tl.int64)
        num_stored_heads = tl.where(slot >= 0, num_k_heads, 0)
        kv_row = tl.maximum(slot, 0)
    kv_out_offset = kv_row * kv_out_token_stride
    _rotate_heads(k_ptr + token * k_token_stride, k_head_stride, k_out_ptr + kv_out_offset, kv_out_head_stride,
                  num_stored_heads, k_norm_ptr, cos, sin, num_k_heads, eps,
                  k_scale, dtype, HALF, BLOCK_HALF, BLOCK_K_HEADS, HAS_NORM, IS_FP8, FP8_MAX)
    if STORE_KV:
        _copy_heads(v_ptr + token * v_token_stride, v_head_stride, v_out_ptr + kv_out_offset, kv_out_head_stride,
                    num_stored_heads, v_scale, HALF, BLOCK_HALF, BLOCK_K_HEADS, IS_FP8, FP8_MAX)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, d, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (row, column block): ``silu(gate) * up`` with gate = x[:, :d] and up = x[:, d:]."""
    wait_for_earlier_kernels(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # torch rounds F.silu's output first
    tl.store(out_ptr + row * d + cols, (silu * up).to(dtype), mask=mask)


def _num_warps(block_elements: int) -> int:
    """Enough warps that each thread holds a handful of elements: 1 warp per 256, between 1 and 8."""
    return max(1, min(8, block_elements // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D [rows, last dim] tensor with a unit inner stride (a view when the layout allows)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden_size = x.shape[-1]
    x2d = _rows(x)
    residual2d = _rows(residual) if residual is not None else x2d
    out = torch.empty(x2d.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    sum_out = torch.empty_like(x2d, memory_format=torch.contiguous_format) if residual is not None else out
    block = triton.next_power_of_2(hidden_size)
    if x2d.shape[0]:  # an empty grid is not launchable
        _rms_norm_kernel[(x2d.shape[0],)](
            x2d, residual2d, weight, out, sum_out,
            x2d.stride(0), residual2d.stride(0), hidden_size, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
            **pdl.launch_options(x.device),
        )
    new_residual = sum_out.view(x.shape) if residual is not None else None
    return out.view(x.shape), new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalize ``x`` [..., hidden] over its last dimension, times ``weight`` [hidden]; a new tensor."""
    out, _ = _launch_rms_norm(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass; both are new tensors, the inputs are untouched."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    out, new_residual = _launch_rms_norm(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


def rotary_qk(
    q: torch.Tensor,  # [T, num_heads, head_dim], any strides with a contiguous last dim
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [T] integer
    cos_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    sin_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    q_norm_weight: torch.Tensor | None = None,  # [head_dim]: Qwen3's per-head RMSNorm before the rotation
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (``rotate_half``) rotary on q and k in one launch, optionally after a per-head RMSNorm.

    Returns new contiguous q and k of the input shapes and dtype.
    """
    k_out = torch.empty((k.shape[0], *k.shape[1:]), dtype=k.dtype, device=k.device)
    q_out = _launch_rotary(q, k, None, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                           k_out, None, None, None)
    return q_out, k_out


def rotary_qk_store_kv(
    q: torch.Tensor,  # [T, num_heads, head_dim], any strides with a contiguous last dim
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [T] integer
    cos_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    sin_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim] (attention/backend.py's layout)
    slot_mapping: torch.Tensor,  # [>= T] int64: each token's cache slot, negative for padding
    k_scale: torch.Tensor | None = None,  # FP8 cache: the layer's K and V scales (None = 1.0)
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rotary_qk``, but the rotated k and v are written into the KV cache at each token's slot in the same launch
    (what the attention backend's own store would do, FP8 quantization included; a negative slot is skipped): one
    kernel instead of two.

    Returns the rotated q, a new contiguous tensor.
    """
    if kv_cache.dim() != 5 or tuple(kv_cache.shape[3:]) != tuple(k.shape[1:]) or v.shape != k.shape:
        raise ValueError(f"rotary_qk_store_kv needs k, v [T, Hkv, D] and a cache [2, blocks, block_size, Hkv, D]; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}, cache {tuple(kv_cache.shape)}")
    if v.stride(-1) != 1:
        raise ValueError(f"rotary_qk_store_kv needs v with a contiguous last dim; got strides {v.stride()}")
    slots = kv_cache.view(2, -1, *kv_cache.shape[3:])  # [2, num_slots, Hkv, D]: a view, writes land in the cache
    return _launch_rotary(q, k, v, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                          slots[0], slots[1], slot_mapping, fp8_kernel_args(kv_cache, k_scale, v_scale))


def _launch_rotary(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, positions: torch.Tensor, cos_cache: torch.Tensor,
    sin_cache: torch.Tensor, q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
    k_out: torch.Tensor, v_out: torch.Tensor | None, slot_mapping: torch.Tensor | None,
    fp8_args: tuple[torch.Tensor, torch.Tensor, dict] | None,
) -> torch.Tensor:
    """Rotate q (into a new tensor, returned) and k (into ``k_out``, rows indexed by token or, with
    ``slot_mapping``, by slot, where v is copied too; ``fp8_args``: ``fp8_kernel_args`` of that cache)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    is_k_like_q = k.shape[0] == num_tokens and k.shape[2] == head_dim
    if head_dim % 2 or not is_k_like_q or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rotary_qk needs q [T, H, D], k [T, Hkv, D] with an even D and contiguous last dims; "
                         f"got q {tuple(q.shape)} strides {q.stride()}, k {tuple(k.shape)} strides {k.stride()}")
    has_norm = q_norm_weight is not None
    if has_norm != (k_norm_weight is not None):
        raise ValueError("rotary_qk needs both q_norm_weight and k_norm_weight, or neither")
    half = head_dim // 2
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    store_kv = slot_mapping is not None
    v_in, v_dst = (v, v_out) if store_kv else (k, k_out)  # unread placeholders without the store
    k_scale, v_scale, fp8 = fp8_args or (k, k, {"IS_FP8": False, "FP8_MAX": 0.0})
    block_q_heads = triton.next_power_of_2(num_q_heads)
    _rotary_qk_kernel[(num_tokens,)](
        q, k, v_in, q_out, k_out, v_dst, slot_mapping if store_kv else positions, positions, cos_cache, sin_cache,
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k,  # unread placeholders without norm
        k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v_in.stride(0), v_in.stride(1),
        k_out.stride(0), k_out.stride(1), cos_cache.stride(0), slot_mapping.shape[0] if store_kv else 0,
        num_q_heads, num_k_heads, eps,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_Q_HEADS=block_q_heads,
        BLOCK_K_HEADS=triton.next_power_of_2(num_k_heads), HAS_NORM=has_norm, STORE_KV=store_kv, **fp8,
        num_warps=_num_warps(block_q_heads * triton.next_power_of_2(half)), **pdl.launch_options(q.device),
    )
    return q_out


_SILU_BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` [..., 2 * d]; a new tensor [..., d]."""
    d = x.shape[-1] // 2
    x2d = _rows(x)
    out = torch.empty((x2d.shape[0], d), dtype=x.dtype, device=x.device)
    block = min(_SILU_BLOCK, triton.next_power_of_2(d))
    if x2d.shape[0]:
        _silu_and_mul_kernel[(x2d.shape[0], triton.cdiv(d, block))](
            x2d, out, x2d.stride(0), d, BLOCK=block, num_warps=_num_warps(block), **pdl.launch_options(x.device)
        )
    return out.view(*x.shape[:-1], d)
