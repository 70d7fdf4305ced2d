"""``FusedMoE``: all experts of one layer in two stacked weights, the checkpoint's per-expert tensors loaded into
them, and the computation on the fused Triton path (CUDA: ``decode_moe`` for steps of a few tokens, the grouped GEMM
of ``fused_moe`` for larger ones) or the torch reference (CPU).

``w13_weight`` [E, 2 * I, H] holds each expert's gate rows then its up rows (one grouped GEMM computes both);
``w2_weight`` [E, H, I] its down projection. Checkpoints store one tensor per expert and projection
(``experts.{e}.gate_proj.weight`` in Qwen3-MoE, ``experts.{e}.w1.weight`` in Mixtral): ``expert_params_mapping``
gives the loader one rule per (expert, projection), whose shard id ``(e, "w1" | "w3" | "w2")`` tells
``weight_loader`` where the tensor goes. Expert or tensor parallelism later narrows E, or I, in that one place.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pagedllm.model.linear import set_weight_loader
from pagedllm.model.moe.router import select_experts
from pagedllm.model.moe.torch_moe import torch_moe
from pagedllm.model.quantization.base import QuantizationConfig, add_param
from pagedllm.platform import triton_ops_enabled

# Shard names of an expert's projections (Mixtral's checkpoint names): gate, down, up.
_GATE, _DOWN, _UP = "w1", "w2", "w3"


def expert_params_mapping(num_experts: int, gate: str, down: str, up: str) -> list[tuple[str, str, tuple[int, str]]]:
    """Loader rules (param name part, checkpoint name part, shard id) for every expert's three projections, named
    ``experts.{e}.{gate|down|up}.weight`` in the checkpoint (``gate_proj``/``down_proj``/``up_proj`` for Qwen3-MoE,
    ``w1``/``w2``/``w3`` for Mixtral). List them before the dense MLP's rules: ``.gate_proj.`` matches both."""
    rules = []
    for expert in range(num_experts):
        for name, param, shard in ((gate, "w13", _GATE), (up, "w13", _UP), (down, "w2", _DOWN)):
            rules.append((f".experts.{param}_weight", f".experts.{expert}.{name}.weight", (expert, shard)))
    return rules


@functools.cache
def _fused_kernels():  # imported on first CUDA use: CPU runs never import Triton
    from pagedllm.model.moe import fused_moe

    return fused_moe


@functools.cache
def _decode_kernels():
    from pagedllm.model.moe import decode_moe

    return decode_moe


class FusedMoE(nn.Module):
    """The experts of one MoE layer (see module doc): ``forward(x, router_logits)`` routes each token to its top-k
    experts and returns the weighted sum of their outputs [T, H]."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 round_weights_to_dtype: bool, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError(f"Quantized MoE experts are not implemented (quantization={quant_config.name!r}); "
                             "run the model unquantized")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and num_experts ({num_experts})")
        self.num_experts, self.top_k = num_experts, top_k
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        self.round_weights_to_dtype = round_weights_to_dtype  # Qwen3-MoE rounds them; Mixtral keeps float32
        self.w13_weight = add_param(self, "w13_weight", torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                    output_dim=1)
        self.w2_weight = add_param(self, "w2_weight", torch.empty(num_experts, hidden_size, intermediate_size),
                                   output_dim=None)
        for param in (self.w13_weight, self.w2_weight):
            param.moe_routing = (top_k, num_experts)  # type: ignore[attr-defined]  # bench rooflines: bytes read
            set_weight_loader(param, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """Copy expert ``shard_id[0]``'s projection ``shard_id[1]`` (w1 gate, w3 up, w2 down) into its slot."""
        expert, shard = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"Expert {expert} is out of range: the model has {self.num_experts} experts")
        size = self.intermediate_size
        target = {_GATE: param.data[expert, :size], _UP: param.data[expert, size:], _DOWN: param.data[expert]}[shard]
        if target.shape != loaded.shape:
            raise ValueError(f"Shape mismatch for expert {expert} {shard}: parameter {tuple(target.shape)}, "
                             f"checkpoint tensor {tuple(loaded.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        fused = uses_fused_moe(x)
        if fused and _decode_kernels().accepts(x.shape[0], self.top_k, x.shape[1]):  # routing inside its launches
            return _decode_kernels().fused_moe_decode(x, self.w13_weight, self.w2_weight, router_logits, self.top_k,
                                                      self.renormalize, self.round_weights_to_dtype)
        weights_dtype = router_logits.dtype if self.round_weights_to_dtype else None
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize, weights_dtype)
        if fused:
            return _fused_kernels().fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return torch_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.w13_weight.shape[2]}, "
                f"intermediate={self.intermediate_size}")


def uses_fused_moe(x: torch.Tensor) -> bool:
    """Whether experts on ``x`` run the fused Triton kernels: CUDA with the fused ops on, unless
    ``PAGEDLLM_MOE_BACKEND=torch`` asks for the reference loop (which then needs ``enforce_eager``)."""
    return x.is_cuda and triton_ops_enabled() and moe_backend() == "triton"


@functools.cache
def moe_backend() -> str:
    """``"triton"`` or ``"torch"``, from ``PAGEDLLM_MOE_BACKEND`` (read once, by config.py)."""
    from pagedllm.config import moe_backend_from_env  # lazy: config imports model.registry

    return moe_backend_from_env()
