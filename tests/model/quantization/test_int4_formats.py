"""The 4-bit formats (GPTQ, AWQ GEMM, compressed-tensors pack-quantized) unpack bit-exactly as the real libraries
do, and pagedllm's int4 layers (plain and fused q/k/v, shards loaded one by one) compute the dequantized dense
product on CPU; mismatching checkpoints and unsupported schemes are clear errors.

Library references: AutoAWQ's ``awq/utils/packing_utils.py`` (pure torch; loaded from its file, since the package
itself imports accelerate) for AWQ, and for GPTQ v1 through its AWQ -> exllama repacker (exllama's layout is GPTQ
v1's, zeros minus one); compressed-tensors' ``pack_to_int32`` / ``unpack_from_int32``. Each skips when absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pagedllm.model.linear import Linear, MergedLinear, QKVLinear
from pagedllm.model.quantization.awq import AWQConfig, unpack_awq_cols
from pagedllm.model.quantization.base import QuantizationConfig
from pagedllm.model.quantization.compressed_tensors_w4a16 import CompressedTensorsW4A16Method
from pagedllm.model.quantization.gptq import GPTQConfig
from pagedllm.model.quantization.int4 import Int4Checkpoint, dequantize_checkpoint, unpack_cols, unpack_rows
from tests.model.quantization.int4_checkpoints import act_order_g_idx, pack, quantize


def _awq_packing_utils() -> ModuleType | None:
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "utils" / "packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


AWQ_UTILS = _awq_packing_utils()
needs_autoawq = pytest.mark.skipif(AWQ_UTILS is None, reason="autoawq is not installed")


def random_checkpoint(n: int, k: int, group_size: int, sym: bool, act_order: bool, seed: int = 0) -> Int4Checkpoint:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    g_idx = act_order_g_idx(k, group_size, seed) if act_order else None
    return quantize(weight, group_size, sym, g_idx)


class _CTConfig(QuantizationConfig):
    """A stand-in for the compressed-tensors parser: one W4A16 scheme for every layer."""

    def __init__(self, group_size: int, sym: bool, actorder: str | None) -> None:
        self.args = (4, group_size, sym, actorder)

    def linear_method(self, checkpoint_prefixes: list[str]) -> CompressedTensorsW4A16Method:
        return CompressedTensorsW4A16Method(*self.args)


def quant_config(fmt: str, group_size: int, sym: bool, act_order: bool) -> QuantizationConfig:
    if fmt in ("gptq", "gptq_v2"):
        return GPTQConfig(group_size=group_size, sym=sym, desc_act=act_order, checkpoint_format=fmt)
    if fmt == "awq":
        return AWQConfig(group_size=group_size)
    return _CTConfig(group_size, sym, "group" if act_order else None)


# -- bit-exact against the libraries --------------------------------------------------------------------------------


@needs_autoawq
@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_unpacks_as_autoawq(group_size: int) -> None:
    ckpt = random_checkpoint(48, 256, group_size, sym=False, act_order=False)
    tensors = pack(ckpt, "awq")
    iweight, izeros = AWQ_UTILS.reverse_awq_order(*AWQ_UTILS.unpack_awq(tensors["qweight"], tensors["qzeros"], 4), 4)
    assert torch.equal(unpack_awq_cols(tensors["qweight"]), iweight.long() & 0xF)
    assert torch.equal(unpack_awq_cols(tensors["qzeros"]), izeros.long() & 0xF)
    reference = AWQ_UTILS.dequantize_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, group_size)
    assert torch.equal(dequantize_checkpoint(ckpt, torch.float16).t(), reference)


@needs_autoawq
def test_gptq_v1_reads_autoawq_exllama_repack() -> None:
    """AutoAWQ repacks AWQ into exllama's layout, GPTQ v1's: qweight packed along K, zeros minus one."""
    ckpt = random_checkpoint(64, 256, 64, sym=False, act_order=False)
    awq = pack(ckpt, "awq")
    qweight, qzeros = AWQ_UTILS.unpack_reorder_pack(awq["qweight"], awq["qzeros"], 4)
    ours = pack(ckpt, "gptq")
    assert torch.equal(ours["qweight"], qweight) and torch.equal(ours["qzeros"], qzeros)
    layer = load_layer(Linear(256, 64, quant_config=GPTQConfig(group_size=64, sym=False)), ours)
    layer.quant_method.process_weights_after_loading(layer)
    reference = AWQ_UTILS.dequantize_gemm(awq["qweight"], awq["qzeros"], awq["scales"], 4, 64)
    x = torch.randn(3, 256)
    # AutoAWQ dequantizes in float16, pagedllm in float32: equal once rounded to float16.
    assert torch.equal(dequantize_checkpoint(ckpt, torch.float16).t(), reference)
    torch.testing.assert_close(layer(x), x @ dequantize_checkpoint(ckpt).t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_unpacks_as_the_library(sym: bool) -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    ckpt = random_checkpoint(40, 128, 32, sym=sym, act_order=True)
    tensors = pack(ckpt, "ct")
    signed = helpers.unpack_from_int32(tensors["weight_packed"], 4, torch.Size([40, 128]))
    assert torch.equal(unpack_cols(tensors["weight_packed"]) - 8, signed.long())
    if not sym:
        zp = helpers.unpack_from_int32(tensors["weight_zero_point"], 4, torch.Size([40, 4]), packed_dim=0)
        assert torch.equal(unpack_rows(tensors["weight_zero_point"]) - 8, zp.long())


# -- layers against the dense reference -----------------------------------------------------------------------------


def load_layer(layer, tensors: dict[str, torch.Tensor], shard=None):
    for name, tensor in tensors.items():
        layer.weight_loader(getattr(layer, name), tensor, shard)
    return layer


FORMATS = ["gptq", "gptq_v2", "awq", "ct"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("group_size", "sym", "act_order"),
                         [(32, False, False), (64, True, True), (-1, False, False), (128, True, False)])
def test_fused_qkv_layer_equals_dequantized_reference(fmt: str, group_size: int, sym: bool, act_order: bool) -> None:
    if fmt == "awq" and (sym or act_order):
        pytest.skip("AWQ has zero points and no act-order")
    hidden, head_dim, heads, kv_heads = 256, 32, 4, 2
    config = quant_config(fmt, group_size, sym, act_order)
    layer = QKVLinear(hidden, head_dim, heads, kv_heads, bias=True, quant_config=config)
    g_idx = act_order_g_idx(hidden, group_size, seed=7) if act_order else None
    dense = []
    for seed, (shard, size) in enumerate((("q", heads * head_dim), ("k", kv_heads * head_dim),
                                          ("v", kv_heads * head_dim))):
        weight = torch.randn(size, hidden, generator=torch.Generator().manual_seed(seed)) / hidden**0.5
        ckpt = quantize(weight, group_size, sym, g_idx)
        dense.append(dequantize_checkpoint(ckpt))
        load_layer(layer, {**pack(ckpt, fmt), "bias": torch.randn(size)}, shard)
        dense_bias = layer.bias.detach().clone()
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, hidden)
    expected = x @ torch.cat(dense).t() + dense_bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.qweight.shape == (layer.output_size, hidden // 8)  # the canonical layout replaced the checkpoint's
    assert (layer.zeros is None) == sym  # symmetric: every zero is the midpoint, kept as the kernels' constant


@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_gate_up_layer(fmt: str) -> None:
    layer = MergedLinear(128, [96, 64], quant_config=quant_config(fmt, 64, False, False))
    dense = []
    for shard, size in enumerate((96, 64)):
        ckpt = random_checkpoint(size, 128, 64, sym=False, act_order=False, seed=shard)
        dense.append(dequantize_checkpoint(ckpt))
        load_layer(layer, pack(ckpt, fmt), shard)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(layer(x), x @ torch.cat(dense).t(), rtol=1e-5, atol=1e-5)


# -- errors ---------------------------------------------------------------------------------------------------------


def test_unsupported_schemes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="8-bit weights are not supported"):
        GPTQConfig.from_config({"bits": 8, "group_size": 128})
    with pytest.raises(ValueError, match="group size 256 is not supported"):
        GPTQConfig.from_config({"bits": 4, "group_size": 256})
    with pytest.raises(ValueError, match="checkpoint_format 'marlin'"):
        GPTQConfig.from_config({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"})
    with pytest.raises(ValueError, match="AWQ version 'gemv'"):
        AWQConfig.from_config({"bits": 4, "group_size": 128, "version": "gemv"})
    with pytest.raises(ValueError, match="zero_point: false"):
        AWQConfig.from_config({"bits": 4, "group_size": 128, "zero_point": False})
    with pytest.raises(ValueError, match="actorder 'sideways'"):
        CompressedTensorsW4A16Method(4, 128, True, "sideways")
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        Linear(192, 64, quant_config=GPTQConfig())


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_of_another_group_size_is_a_shape_error(fmt: str) -> None:
    layer = Linear(256, 64, quant_config=quant_config(fmt, 128, False, False))
    tensors = pack(random_checkpoint(64, 256, 64, sym=False, act_order=False), fmt)  # groups of 64, not 128
    with pytest.raises(ValueError, match="Shape mismatch"):
        load_layer(layer, tensors)


def test_fused_shards_with_different_act_orders_are_an_error() -> None:
    layer = MergedLinear(128, [64, 64], quant_config=quant_config("gptq", 32, True, True))
    for shard in (0, 1):
        ckpt = quantize(torch.randn(64, 128), 32, True, act_order_g_idx(128, 32, seed=shard))
        load_layer(layer, pack(ckpt, "gptq"), shard)
    with pytest.raises(ValueError, match="different g_idx"):
        layer.quant_method.process_weights_after_loading(layer)


def test_g_idx_with_uneven_groups_is_an_error() -> None:
    layer = Linear(128, 64, quant_config=quant_config("gptq", 32, True, True))
    tensors = pack(quantize(torch.randn(64, 128), 32, True, None), "gptq")
    tensors["g_idx"] = torch.zeros(128, dtype=torch.int32)  # every column in group 0
    load_layer(layer, tensors)
    with pytest.raises(ValueError, match="does not give every group 32 columns"):
        layer.quant_method.process_weights_after_loading(layer)


def test_compressed_tensors_weight_shape_must_match() -> None:
    layer = Linear(128, 64, quant_config=_CTConfig(32, True, None))
    tensors = pack(quantize(torch.randn(64, 128), 32, True, None), "ct")
    tensors["weight_shape"] = torch.tensor([64, 120])
    load_layer(layer, tensors)
    with pytest.raises(ValueError, match="weight_shape"):
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize(("checkpoint_format", "sym"), [("gptq", True), ("gptq_v2", True), ("gptq", False)])
def test_gptq_dummy_zeros_are_a_symmetric_checkpoints(checkpoint_format: str, sym: bool) -> None:
    """Dummy weights of a symmetric GPTQ scheme hold what real ones do (every zero 8, stored as 7 by v1), so the
    loader drops them as it would a checkpoint's; an asymmetric scheme keeps random zeros."""
    config = GPTQConfig(group_size=64, sym=sym, checkpoint_format=checkpoint_format)
    layer = Linear(128, 64, quant_config=config)
    generator = torch.Generator().manual_seed(0)
    for param in layer.parameters():
        param.dummy_init(param.data, generator)
    layer.quant_method.process_weights_after_loading(layer)
    assert (layer.zeros is None) == sym
