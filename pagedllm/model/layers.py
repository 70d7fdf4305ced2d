"""Building blocks of the Llama family: RMSNorm, rotary embedding (with scaling variants), SiLU-and-mul,
the token embedding and the LM head.

Numerics follow HF transformers op for op (RMSNorm in float32, cos/sin computed in float32 then cast to the
activation dtype) so that float32 logits match HF's to rounding error.

On CUDA, RMSNorm (with its residual add), rotary (with Qwen3's q/k norm) and SiLU-and-mul each run as one fused
Triton kernel (``triton_ops.py``, same numerics up to rounding) unless ``PAGEDLLM_DISABLE_TRITON_OPS=1``; on CPU
they are the plain torch code here, which is also the reference the kernels are tested against. On CUDA,
``rotate_qk_into_cache`` also stores K/V into the paged cache in rotary's launch, and in a decode step
``attend_rotated`` leaves rotary and that store to the attention kernel (one launch for all three);
``rms_norm_linear`` and ``silu_mul_linear`` run the norm or the activation inside the following projection's kernel
where its method offers that (``fused_input_linear``): the dense skinny GEMM and FP8's one-row GEMV can, both
switched off because they measured slower (``FUSE_NORM_AND_ACTIVATION_INTO_GEMM``, ``fp8_gemm.FUSE_INPUT_INTO_GEMV``).
``linear_norm_linear`` runs the post-attention norm in the o projection's epilogue instead (``FUSE_NORM_INTO_OUTPUT``,
off until measured).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, DecodeRotary
from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.model.gemm import linear, skinny_gemm_for
from pagedllm.model.linear import Linear, default_weight_loader, set_weight_loader
from pagedllm.model.quantization.base import FusedInputLinear
from pagedllm.platform import triton_ops_enabled


def use_triton_ops(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` take the fused Triton path: only CUDA tensors, and only when enabled (cached)."""
    return x.is_cuda and triton_ops_enabled()


@functools.cache
def _triton_ops() -> ModuleType:
    """The kernel module, imported on first CUDA use so that CPU-only runs never import or compile Triton."""
    from pagedllm.model import triton_ops

    return triton_ops


class RMSNorm(nn.Module):
    """RMS normalization with an optional fused residual add (as in vLLM).

    ``forward(x)`` returns the normalized ``x``. ``forward(x, residual)`` first adds ``residual`` to ``x`` and
    returns ``(normalized sum, sum)``: the sum is the next residual stream, which saves a separate add per layer
    and is where a fused kernel slots in later.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if use_triton_ops(x):
            if residual is None:
                return _triton_ops().rms_norm(x, self.weight, self.eps)
            return _triton_ops().fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# The norm before qkv / gate_up and the activation before down inside the skinny GEMM's prologue: exact up to a
# rounding step and tested, but measured slower on an H200 (Qwen3-0.6B decode step 1.125 -> 1.322 ms, see
# skinny_gemm.py and benchmarks/h200/issue14-decode-fusions), so decode steps run them as their own kernels.
FUSE_NORM_AND_ACTIVATION_INTO_GEMM = False


def fused_gemm_kernels(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """The skinny-GEMM module when a norm or an activation before ``linear(x, weight)`` runs inside the GEMM's
    prologue (switched on, and a decode-sized x on CUDA with the fused ops on), else None: the ops then run one by
    one."""
    if not FUSE_NORM_AND_ACTIVATION_INTO_GEMM:
        return None
    return skinny_gemm_for(x, weight)


def rms_norm_linear(
    norm: RMSNorm, layer: Linear, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer(norm(x + residual))`` and the new residual stream ``x + residual`` (``x`` when ``residual`` is None,
    as in the first layer); one launch, the norm in the GEMM's prologue, where ``fused_input_linear`` says."""
    fused = fused_input_linear(layer, x)
    if fused is not None:
        return fused.rms_norm_linear(x, residual, norm.weight, norm.eps)
    if residual is None:
        return layer(norm(x)), x
    normed, residual = norm(x, residual)
    return layer(normed), residual


# The residual add and the RMSNorm after a decoder layer's o projection inside that projection's launch
# (``skinny_gemm.gemm_add_rms_norm``: the last row block to finish normalizes the whole rows), one launch per layer
# fewer. It keeps the plain kernel's K loop for sm_90 (benchmarks/scripts/skinny_gemm_ptx.py) but is not measured on
# a GPU yet, so off; ``benchmarks/scripts/without_decode_kernels.py +norm_epilogue`` switches it on.
FUSE_NORM_INTO_OUTPUT = False


def linear_add_rms_norm(
    layer: Linear, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm(layer(x) + residual)`` and the sum (the next residual stream): in one launch where
    ``_output_norm_kernels`` says, else the projection then ``norm``'s fused add."""
    kernels = _output_norm_kernels(layer, x)
    if kernels is not None:
        return kernels.gemm_add_rms_norm(x, layer.weight, layer.bias, residual, norm.weight, norm.eps)
    return norm(layer(x), residual)


def linear_norm_linear(
    first: Linear, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, second: Linear
) -> tuple[torch.Tensor, torch.Tensor]:
    """``second(norm(first(x) + residual))`` and ``first(x) + residual``: the norm in ``first``'s epilogue where
    ``linear_add_rms_norm`` runs it there, else where ``rms_norm_linear`` puts it."""
    if _output_norm_kernels(first, x) is not None:
        normed, residual = linear_add_rms_norm(first, x, residual, norm)
        return second(normed), residual
    return rms_norm_linear(norm, second, first(x), residual)


def _output_norm_kernels(layer: Linear, x: torch.Tensor) -> ModuleType | None:
    """The skinny-GEMM module where the norm after ``layer(x)`` runs in the GEMM's epilogue: switched on, a dense
    layer without LoRA (its delta comes after the GEMM) or an all-reduce, a decode-sized x on CUDA."""
    if not FUSE_NORM_INTO_OUTPUT or layer.lora is not None or layer.tp_comm is not None or not layer.is_dense:
        return None
    return skinny_gemm_for(x, layer.weight)


def fused_input_linear(layer: Linear, x: torch.Tensor) -> FusedInputLinear | None:
    """``layer`` with the op before it inside its kernel, for an input like ``x``, or None: a dense layer on the
    skinny GEMM (``fused_gemm_kernels``), or what the layer's quantization method offers (FP8's one-row GEMV). Not
    with LoRA (its delta needs the computed input) or a row-parallel layer (its all-reduce)."""
    if layer.lora is not None or layer.tp_comm is not None or not use_triton_ops(x):
        return None
    if layer.is_dense:
        kernels = fused_gemm_kernels(x, layer.weight)
        return SkinnyFusedInput(kernels, layer) if kernels is not None else None
    return layer.quant_method.fused_input(layer, x)


@dataclass(frozen=True)
class SkinnyFusedInput:
    """``FusedInputLinear`` of a dense layer on the skinny GEMM's fused variants."""

    kernels: ModuleType
    layer: Linear

    def rms_norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.rms_norm_gemm(x, residual, norm_weight, eps, self.layer.weight, self.layer.bias)

    def silu_mul_linear(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_mul_gemm(gate_up, self.layer.weight, self.layer.bias)


def compute_inv_freq(head_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, as HF ``modeling_rope_utils`` computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_scaling is None:
        return inv_freq
    rope_type = rope_scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"Unsupported rope_scaling type {rope_type!r}; supported: linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth blend in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, neox / ``rotate_half`` layout (HF Llama), from a precomputed cos/sin cache.

    The cache holds one row per position and ``head_dim // 2`` columns: HF's cos/sin repeat the same half twice,
    so applying the two halves separately is the same arithmetic at half the memory.
    """

    def __init__(
        self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        # Computed on the CPU in float32 (like HF), whatever the default device/dtype when the model is built.
        with torch.device("cpu"):
            inv_freq = compute_inv_freq(head_dim, base, rope_scaling)
            positions = torch.arange(max_position, dtype=torch.float32)
            freqs = positions[:, None] * inv_freq[None, :]  # [max_position, head_dim // 2]
            cos, sin = freqs.cos(), freqs.sin()
        # Non-persistent: never in a checkpoint; moved by .to(device) with the model. Kept in float32 until use.
        self.register_buffer("cos_cache", cos.to(torch.get_default_device()), persistent=False)
        self.register_buffer("sin_cache", sin.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [num_tokens, 1, head_dim // 2] for ``positions``, in ``dtype``; shared by all layers."""
        cos = self.cos_cache[positions].to(dtype).unsqueeze(1)
        sin = self.sin_cache[positions].to(dtype).unsqueeze(1)
        return cos, sin

    def step_inputs(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryStep:
        """What every layer of one step needs to rotate q and k (see ``RotaryStep``), prepared once per step."""
        if use_triton_ops(positions):
            return RotaryStep(positions, self.cos_cache, self.sin_cache, is_gathered=False)
        cos, sin = self(positions, dtype)
        return RotaryStep(positions, cos, sin, is_gathered=True)


@dataclass(frozen=True)
class RotaryStep:
    """Rotary inputs of one step, shared by all layers.

    Torch path (``is_gathered``): ``cos``/``sin`` are this step's rows [T, 1, head_dim // 2] in the activation
    dtype, gathered once for all layers. Fused path: they are the whole float32 tables [max_position,
    head_dim // 2], which the kernel indexes by ``positions`` itself (a gather per layer is cheaper there than
    an extra kernel launch).
    """

    positions: torch.Tensor  # [T]
    cos: torch.Tensor
    sin: torch.Tensor
    is_gathered: bool


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [num_tokens, num_heads, head_dim]; equals HF's ``x * cos + rotate_half(x) * sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    rope: RotaryStep,
    q_norm: RMSNorm | None = None,
    k_norm: RMSNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on q [T, H, D] and k [T, Hkv, D], after the per-head ``q_norm``/``k_norm`` when given (Qwen3)."""
    if not rope.is_gathered:  # one fused launch for the norms and both rotations
        q_weight = q_norm.weight if q_norm is not None else None
        k_weight = k_norm.weight if k_norm is not None else None
        eps = q_norm.eps if q_norm is not None else 0.0
        return _triton_ops().rotary_qk(q, k, rope.positions, rope.cos, rope.sin, q_weight, k_weight, eps)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)


def stores_kv_with_rotary(rope: RotaryStep) -> bool:
    """Whether rotary writes k and v into the KV cache itself (the fused path: one launch instead of two)."""
    return not rope.is_gathered


def rotate_qk_into_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: RotaryStep,
    q_norm: RMSNorm | None,
    k_norm: RMSNorm | None,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``rotate_qk``, and on the fused path also the store of k and v into ``kv_cache`` at ``slot_mapping`` (divided
    by ``k_scale``/``v_scale`` for an FP8 cache), in the same launch: k and v then come back as None, which tells
    the attention backend they are stored already."""
    if not stores_kv_with_rotary(rope):
        q, k = rotate_qk(q, k, rope, q_norm, k_norm)
        return q, k, v
    q_weight, k_weight = (q_norm.weight, k_norm.weight) if q_norm is not None and k_norm is not None else (None, None)
    eps = q_norm.eps if q_norm is not None else 0.0
    q = _triton_ops().rotary_qk_store_kv(q, k, v, rope.positions, rope.cos, rope.sin, q_weight, k_weight, eps,
                                         kv_cache, slot_mapping, k_scale, v_scale)
    return q, None, None


# A decode step rotates q and k inside the attention kernel, which also stores k and v (``DecodeRotary``): one
# launch per layer instead of the rotary kernel's and the attention kernel's. Where the caller allows it: on an H200
# (benchmarks/h200/session33, calls 3-4, interleaved) the batch-1 decode step of Llama-3.1-8B went from 4.17 / 4.21 to
# 4.13 / 4.17 ms, but with FP8 weights from 2.60 / 2.62 to 2.65 / 2.67 ms, so LlamaAttention allows it only after a
# dense qkv projection (Qwen3-0.6B: 0.94 / 1.10 against 0.93 / 1.18 ms, within its host noise).
FUSE_ROTARY_INTO_DECODE = True


def attend_rotated(
    attn_backend: AttentionBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: RotaryStep,
    q_norm: RMSNorm | None,
    k_norm: RMSNorm | None,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sliding_window: int = 0,
    rotary_in_decode: bool = True,
) -> torch.Tensor:
    """Attention over un-rotated q [T, H, D], k and v [T, Hkv, D]: rotary (after Qwen3's per-head norms) and the
    store of k and v into the cache happen inside the backend's decode kernel where ``rotary_in_decode`` allows it
    and ``_decode_kernel_rotates``, else in ``rotate_qk_into_cache`` before ``attn_backend.forward``."""
    if rotary_in_decode and _decode_kernel_rotates(attn_backend, rope, metadata):
        weights = (q_norm.weight, k_norm.weight) if q_norm is not None and k_norm is not None else (None, None)
        rotary = DecodeRotary(k, v, rope.positions, rope.cos, rope.sin, *weights,
                              q_norm.eps if q_norm is not None else 0.0)
        return attn_backend.decode_with_rotary(q, rotary, kv_cache, metadata, scale, k_scale, v_scale, sliding_window)
    q, k, v = rotate_qk_into_cache(q, k, v, rope, q_norm, k_norm, kv_cache, metadata.slot_mapping, k_scale, v_scale)
    return attn_backend.forward(q, k, v, kv_cache, metadata, scale, k_scale, v_scale, sliding_window=sliding_window)


def _decode_kernel_rotates(attn_backend: AttentionBackend, rope: RotaryStep, metadata: AttentionMetadata) -> bool:
    """Switched on, the fused rotary path (CUDA), a decode step, and a backend with ``decode_with_rotary``."""
    return (FUSE_ROTARY_INTO_DECODE and stores_kv_with_rotary(rope) and metadata.max_query_len == 1
            and getattr(attn_backend, "rotates_in_decode", False))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused ``[..., 2 * d]`` gate/up projection output (gate first)."""
    if use_triton_ops(x):
        return _triton_ops().silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a fused ``[..., 2 * d]`` gate/up projection (gate first), as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


def silu_mul_linear(layer: Linear, gate_up: torch.Tensor) -> torch.Tensor:
    """``layer(silu(gate) * up)`` for a fused ``[..., 2 * d]`` gate/up output; one launch that computes the
    activation as the GEMM loads its input, where ``fused_input_linear`` says."""
    fused = fused_input_linear(layer, gate_up[..., : layer.input_size])
    if fused is not None:
        return fused.silu_mul_linear(gate_up)
    return layer(silu_and_mul(gate_up))


class VocabEmbedding(nn.Module):
    """Token embedding table [vocab_size, hidden_size]. Under tensor parallelism (vocab-parallel) each rank holds
    ``ceil(vocab_size / tp)`` consecutive rows (the last rank's tail zero padding): a rank looks up the ids in its
    range, zeros the others, and one all-reduce sums the ranks' lookups."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = get_parallel_state().tp
        self.num_rows = -(-vocab_size // self.tp.size)  # this rank's rows
        self.vocab_start = self.tp.rank * self.num_rows
        self.vocab_end = min(self.vocab_start + self.num_rows, vocab_size)
        self.tp_comm = self.tp.comm if self.tp.size > 1 else None
        self.weight = nn.Parameter(torch.empty(self.num_rows, hidden_size), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader if self.tp.size > 1 else default_weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """This rank's rows of the checkpoint table (padding rows zero)."""
        if shard_id is not None:
            raise ValueError(f"This parameter is not fused; got shard id {shard_id!r}")
        rows = self.vocab_end - self.vocab_start
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.vocab_start : self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_comm is None:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        embedded = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return self.tp_comm.all_reduce(embedded)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits; with ``tied_to`` it reuses the embedding table's weight.

    Under tensor parallelism each rank computes the logits of its vocabulary rows and an all-gather gives every rank
    the whole row: every rank then samples the same tokens from the same logits with the same seeds, so every
    runner keeps the same request state without a broadcast of the sampled ids (see ``worker/model_runner.py``)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.is_tied = tied_to is not None
        embedding = tied_to if tied_to is not None else VocabEmbedding(vocab_size, hidden_size)
        self.tp_comm = embedding.tp_comm
        if tied_to is not None:
            self.weight = tied_to.weight  # the same Parameter: loaded once, listed once by named_parameters()
        else:  # the same row layout as an embedding table (vocab-parallel under tensor parallelism)
            self.weight = embedding.weight
            del embedding

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] in float32 (sampling and logprobs want the precision)."""
        logits = linear(hidden_states, self.weight).float()
        if self.tp_comm is None:
            return logits
        return self.tp_comm.all_gather(logits, dim=-1)[:, : self.vocab_size]


class PPMissingLayer(nn.Module):
    """A place holder for a module another pipeline stage holds: no parameters, never called; the loader skips
    checkpoint tensors under it."""
