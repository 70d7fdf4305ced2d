"""Layers against HF's definitions: rotary frequencies and application, RMSNorm, fused-linear weight loaders."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from pagedllm.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul, apply_rotary, compute_inv_freq
from pagedllm.model.linear import Linear, MergedLinear, QKVLinear

ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


def hf_config(rope: dict | None, head_dim: int = 64) -> transformers.LlamaConfig:
    params = {"rope_theta": 500000.0, **(rope or {"rope_type": "default"})}
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=2048, rope_parameters=params)


@pytest.mark.parametrize("rope", [None, "linear", "llama3"])
def test_inv_freq_equals_hf(rope: str | None) -> None:
    scaling = ROPES.get(rope)
    config = hf_config(scaling)
    if rope is None:
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope](config)
    torch.testing.assert_close(compute_inv_freq(64, 500000.0, scaling), expected, atol=0, rtol=0)


@pytest.mark.parametrize("rope", [None, "llama3"])
def test_rotary_equals_hf(rope: str | None) -> None:
    scaling = ROPES.get(rope)
    hf_rope = LlamaRotaryEmbedding(hf_config(scaling))
    ours = RotaryEmbedding(64, 2048, 500000.0, scaling)
    positions = torch.tensor([0, 1, 5, 300, 2047])
    q, k = torch.randn(5, 4, 64), torch.randn(5, 2, 64)
    cos, sin = hf_rope(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    our_cos, our_sin = ours(positions, q.dtype)
    torch.testing.assert_close(apply_rotary(q, our_cos, our_sin), q_hf[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rotary(k, our_cos, our_sin), k_hf[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_rmsnorm_fused_residual_equals_add_then_norm() -> None:
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data = torch.rand(16) + 0.5
    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    normed, new_residual = norm(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, norm(x + residual))
    expected = (x + residual) * torch.rsqrt((x + residual).pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(normed, expected)


def test_silu_and_mul() -> None:
    x = torch.randn(3, 8)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])


def test_qkv_linear_loads_shards_in_order() -> None:
    layer = QKVLinear(hidden_size=8, head_dim=2, num_heads=4, num_kv_heads=2, bias=True)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    for shard_id, tensor in (("v", v), ("q", q), ("k", k)):  # any order
        layer.weight.weight_loader(layer.weight, tensor, shard_id)
        layer.bias.weight_loader(layer.bias, tensor[:, 0], shard_id)
    assert torch.equal(layer.weight, torch.cat([q, k, v]))
    assert torch.equal(layer.bias, torch.cat([q[:, 0], k[:, 0], v[:, 0]]))
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), x @ torch.cat([q, k, v]).T + layer.bias)
    with pytest.raises(ValueError, match="Unknown shard id"):
        layer.weight.weight_loader(layer.weight, q, "x")
    with pytest.raises(ValueError, match="Shape mismatch"):
        layer.weight.weight_loader(layer.weight, q, "k")


def test_merged_and_plain_linear_loaders() -> None:
    merged = MergedLinear(4, [3, 5])
    gate, up = torch.randn(3, 4), torch.randn(5, 4)
    merged.weight.weight_loader(merged.weight, up, 1)
    merged.weight.weight_loader(merged.weight, gate, 0)
    assert torch.equal(merged.weight, torch.cat([gate, up]))
    assert merged.bias is None
    plain = Linear(4, 3)
    plain.weight.weight_loader(plain.weight, gate.double())  # casts to the parameter's dtype
    assert plain.weight.dtype == torch.float32 and torch.equal(plain.weight, gate)
    with pytest.raises(ValueError, match="Shape mismatch"):
        plain.weight.weight_loader(plain.weight, up)
