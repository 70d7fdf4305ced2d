"""Top-k expert selection from the router's logits, as the HF models do it.

Qwen3-MoE and Mixtral both take a softmax over all experts in float32, keep the top k, and (Mixtral always,
Qwen3-MoE when ``norm_topk_prob``) renormalize the k kept weights to sum to 1. Mixtral's paper states it as a
softmax over the top-k logits, which is the same value; following HF's order of operations keeps float32 results
equal to HF's to the last bit, so greedy parity tests do not flip an expert on a rounding tie.
"""

from __future__ import annotations

import torch


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights [T, top_k] and expert ids [T, top_k] (int64) of each token's top-k experts.

    ``weights_dtype``: round the weights to it at the end (Qwen3-MoE rounds them to the logits' dtype; Mixtral keeps
    float32); None keeps float32. Static shapes and no host sync: safe inside a CUDA graph.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    return weights, ids
