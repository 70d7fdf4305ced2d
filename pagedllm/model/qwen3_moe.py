"""Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B): Qwen3 attention (q/k RMSNorm per head) with sparse
MoE feed-forwards.

Routing is a softmax over all experts, the top ``num_experts_per_tok`` kept and renormalized when
``norm_topk_prob``; layers listed in ``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, keep a dense MLP
of ``intermediate_size``. Qwen3-MoE has no shared experts (Qwen2-MoE's ``shared_expert_intermediate_size``):
a config asking for them is refused.
"""

from __future__ import annotations

from typing import Any

from pagedllm.config import ModelConfig
from pagedllm.model.llama import LlamaVariant
from pagedllm.model.moe.decoder import MoEForCausalLM, MoESpec, reject_unsupported


def _is_sparse_layer(hf: dict[str, Any], num_experts: int):
    dense_layers = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1) or 1
    return lambda index: index not in dense_layers and num_experts > 0 and (index + 1) % step == 0


class Qwen3MoeForCausalLM(MoEForCausalLM):
    """Qwen3-MoE over a paged KV cache."""

    @classmethod
    def moe_spec(cls, config: ModelConfig) -> MoESpec:
        hf = config.hf_config
        reject_unsupported(hf, config.architecture, {"shared_expert_intermediate_size": "falsy",
                                                     "hidden_act": "silu"})
        num_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
        return MoESpec(
            num_experts=num_experts,
            top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            renormalize=bool(hf.get("norm_topk_prob", False)),
            round_weights_to_dtype=True,
            is_sparse_layer=_is_sparse_layer(hf, num_experts),
            block_name="mlp",
            expert_names=("gate_proj", "down_proj", "up_proj"),
        )

    @classmethod
    def attention_variant(cls, config: ModelConfig) -> LlamaVariant:
        bias = bool(config.hf_config.get("attention_bias", False))
        return LlamaVariant(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
