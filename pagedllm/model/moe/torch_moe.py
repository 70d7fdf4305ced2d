"""The experts' computation in plain torch: the CPU path and the oracle the Triton kernels are tested against.

The same loop as HF transformers' experts (each hit expert takes its tokens, ``down(silu(gate) * up)`` times the
routing weight, added into the output in expert order), so float32 results match HF's bit for bit on CPU. It
indexes with data-dependent shapes (a host sync per expert), so it cannot run inside a CUDA graph: on CUDA the
fused kernels do (``fused_moe.py``); this path is there for comparison with ``enforce_eager``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]: gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` for every token t: [T, H] in ``x``'s dtype."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("The torch MoE path syncs with the host and cannot be captured in a CUDA graph; run with "
                           "enforce_eager=True or use the fused Triton path")
    out = torch.zeros_like(x)
    num_experts = w13.shape[0]
    hit = torch.zeros(num_experts, dtype=torch.bool, device=x.device)
    hit[topk_ids.reshape(-1)] = True
    for expert in hit.nonzero().flatten().tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        gate, up = F.linear(x[token_idx], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
