"""Mixtral (``MixtralForCausalLM``, e.g. Mixtral-8x7B): Mistral attention with a sparse MoE block in every layer.

The router keeps the top ``num_experts_per_tok`` of ``num_local_experts`` experts with weights softmaxed over the
kept logits (HF computes it as a softmax over all, then renormalized: the same value; we follow HF's order). The
block and its experts are named ``block_sparse_moe.experts.{e}.w1/w2/w3`` in checkpoints.
"""

from __future__ import annotations

from pagedllm.config import ModelConfig
from pagedllm.model.llama import LlamaVariant
from pagedllm.model.moe.decoder import MoEForCausalLM, MoESpec, reject_unsupported


class MixtralForCausalLM(MoEForCausalLM):
    """Mixtral over a paged KV cache."""

    @classmethod
    def moe_spec(cls, config: ModelConfig) -> MoESpec:
        hf = config.hf_config
        reject_unsupported(hf, config.architecture, {"hidden_act": "silu"})
        return MoESpec(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["intermediate_size"],
            renormalize=True,
            round_weights_to_dtype=False,
            is_sparse_layer=lambda index: True,
            block_name="block_sparse_moe",
            expert_names=("w1", "w2", "w3"),
        )

    @classmethod
    def attention_variant(cls, config: ModelConfig) -> LlamaVariant:
        return LlamaVariant(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)
