"""Which linear method each layer of a quantized checkpoint gets, and the errors for what pagedllm does not run:
compressed-tensors config parsing (targets, ignore, fused parts), FP8 config parsing, checkpoint / flag mismatches
and missing scales."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pagedllm.config import ModelConfig
from pagedllm.model.loader import get_model
from pagedllm.model.quantization.compressed_tensors import CompressedTensorsConfig
from pagedllm.model.quantization.fp8 import Fp8Config, Fp8LinearMethod
from pagedllm.model.quantization.unquantized import UnquantizedLinearMethod

QKV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
FP8_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
FP8_TOKENS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
INT4_GROUPS = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True,
               "dynamic": False, "actorder": None}


def ct_config(groups: dict, ignore: list[str] | None = None, fmt: str = "float-quantized") -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": groups,
            "ignore": ignore or ["lm_head"], "quantization_status": "compressed"}


def fp8_group(targets: list[str], weights: dict | None = None, inputs: dict | None = FP8_TOKENS) -> dict:
    return {"targets": targets, "weights": weights or FP8_WEIGHTS, "input_activations": inputs}


def method(config: dict, prefixes: list[str]):
    return CompressedTensorsConfig.from_config(config).linear_method(prefixes)


def test_linear_target_covers_every_projection() -> None:
    config = ct_config({"group_0": fp8_group(["Linear"])})
    for prefixes in (QKV, ["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"],
                     ["model.layers.3.mlp.down_proj"], ["model.layers.3.self_attn.o_proj"]):
        chosen = method(config, prefixes)
        assert isinstance(chosen, Fp8LinearMethod)
        assert chosen.scheme.weight_strategy == "channel" and chosen.scheme.activations == "dynamic_token"


def test_most_specific_target_wins() -> None:
    per_tensor = {**FP8_WEIGHTS, "strategy": "tensor"}
    config = ct_config({"a": fp8_group(["Linear"]), "b": fp8_group(["re:.*down_proj$"], per_tensor),
                        "c": fp8_group(["model.layers.1.mlp.down_proj"], inputs=None)})
    assert method(config, ["model.layers.0.mlp.down_proj"]).scheme.weight_strategy == "tensor"
    assert method(config, ["model.layers.1.mlp.down_proj"]).scheme.activations == "none"
    assert method(config, ["model.layers.1.self_attn.o_proj"]).scheme.weight_strategy == "channel"


def test_ignored_and_untargeted_layers_stay_dense() -> None:
    config = ct_config({"g": fp8_group(["re:.*self_attn.*"])}, ignore=["lm_head", "re:model.layers.0.*"])
    assert isinstance(method(config, ["model.layers.0.self_attn.o_proj"]), UnquantizedLinearMethod)  # ignored
    assert isinstance(method(config, ["model.layers.1.mlp.down_proj"]), UnquantizedLinearMethod)  # not targeted
    assert isinstance(method(config, ["model.layers.1.self_attn.o_proj"]), Fp8LinearMethod)


def test_fused_parts_quantized_differently_is_an_error() -> None:
    config = ct_config({"g": fp8_group(["Linear"])}, ignore=["model.layers.0.self_attn.k_proj"])
    with pytest.raises(ValueError, match=r"parts of one fused layer are quantized differently.*k_proj: not quant"):
        method(config, QKV)
    two_groups = ct_config({"a": fp8_group(["re:.*q_proj"]), "b": fp8_group(["re:.*[kv]_proj"], inputs=None)})
    with pytest.raises(ValueError, match="quantized differently"):
        method(two_groups, QKV)


@pytest.mark.parametrize(("group", "fmt", "message"), [
    (fp8_group(["Linear"], {**FP8_WEIGHTS, "num_bits": 4}), "float-quantized", "float weights of 4 bits"),
    (fp8_group(["Linear"], {**FP8_WEIGHTS, "strategy": "block", "block_structure": [128, 128]}),
     "float-quantized", "weight strategy 'block'"),
    (fp8_group(["Linear"], inputs={**FP8_TOKENS, "type": "int"}), "float-quantized", "int 8-bit activations"),
    (fp8_group(["Linear"], inputs={**FP8_TOKENS, "dynamic": False}), "float-quantized", "strategy 'token'"),
    (fp8_group(["Linear"]), "dense", "FP8 weights in format 'dense'"),
    ({"targets": ["Linear"], "weights": {**INT4_GROUPS, "num_bits": 8}, "input_activations": FP8_TOKENS | {
        "type": "int"}}, "int-quantized", "Unsupported compressed-tensors scheme"),
    ({"targets": ["Linear"], "weights": None, "input_activations": FP8_TOKENS}, "float-quantized",
     "quantizes no weights"),
])
def test_unsupported_schemes_are_named(group: dict, fmt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        method(ct_config({"group_0": group}, fmt=fmt), ["model.layers.0.mlp.down_proj"])
    assert "group_0" in str(info.value)


def test_config_level_errors() -> None:
    with pytest.raises(ValueError, match="needs a checkpoint written in that format"):
        CompressedTensorsConfig.from_config(None)
    with pytest.raises(ValueError, match="no config_groups"):
        CompressedTensorsConfig.from_config(ct_config({}))
    with pytest.raises(ValueError, match="sparsity_config"):
        CompressedTensorsConfig.from_config({**ct_config({"g": fp8_group(["Linear"])}),
                                             "sparsity_config": {"format": "sparse-24-bitmask"}})


def test_int4_pack_quantized_maps_to_the_w4a16_method() -> None:
    config = ct_config({"group_0": {"targets": ["Linear"], "weights": INT4_GROUPS, "input_activations": None}},
                       fmt="pack-quantized")
    if importlib.util.find_spec("pagedllm.model.quantization.compressed_tensors_w4a16") is None:
        with pytest.raises(ValueError, match="int4 weight-only .* not supported yet"):
            method(config, QKV)
        pytest.skip("compressed_tensors_w4a16 (the int4 method) is not there yet")
    chosen = method(config, QKV)
    assert type(chosen).__name__ == "CompressedTensorsW4A16Method"


def test_fp8_config_parsing() -> None:
    static = Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "static",
                                    "ignored_layers": ["model.layers.0.mlp.down_proj"]})
    assert static.scheme.activations == "static" and static.scheme.weight_strategy == "tensor"
    assert isinstance(static.linear_method(["model.layers.0.mlp.down_proj"]), UnquantizedLinearMethod)
    online = Fp8Config.from_config(None)
    assert not online.scheme.is_serialized and online.scheme.weight_strategy == "channel"
    with pytest.raises(ValueError, match=r"Block-wise FP8 .*weight_block_size=\[128, 128\]"):
        Fp8Config.from_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="activation_scheme 'token'"):
        Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "token"})
    with pytest.raises(ValueError, match="all\nparts|all parts of a fused"):
        Fp8Config.from_config({"quant_method": "fp8", "ignored_layers": [QKV[0]]}).linear_method(QKV)


def write_fp8_config(model_dir: str, quantization_config: dict, out: Path) -> str:
    out.mkdir()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return str(out)


def test_checkpoint_and_flag_mismatch(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    ct_dir = write_fp8_config(tiny_model_dir("llama"), ct_config({"g": fp8_group(["Linear"])}), tmp_path / "ct")
    with pytest.raises(ValueError, match="quantization='fp8' does not match the checkpoint.*'compressed-tensors'"):
        ModelConfig.from_pretrained(ct_dir, None, quantization="fp8")
    with pytest.raises(ValueError, match="needs a checkpoint written in that format"):
        get_model(ModelConfig.from_pretrained(tiny_model_dir("llama"), None, quantization="compressed-tensors"),
                  "dummy", "cpu")
    with pytest.raises(ValueError, match="needs a checkpoint quantized with it"):
        get_model(ModelConfig.from_pretrained(tiny_model_dir("llama"), None, quantization="compressed-tensors"),
                  "auto", "cpu")


def test_missing_scale_is_named(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from tests.model.quantization.fp8_checkpoints import write_compressed_tensors_fp8

    fp8_dir = Path(write_compressed_tensors_fp8(tiny_model_dir("llama"), tmp_path / "fp8", "tensor", "static"))
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"], tensors["model.layers.0.mlp.up_proj.input_scale"]
    save_file(tensors, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 2 weights: model.layers.0.mlp.up_proj.input_scale, "
                                         r"model.layers.1.self_attn.k_proj.weight_scale"):
        get_model(ModelConfig.from_pretrained(str(fp8_dir), None), "auto", "cpu")


def test_dense_weights_in_an_fp8_checkpoint_are_refused(tiny_model_dir: Callable[[str], str],
                                                        tmp_path: Path) -> None:
    """A checkpoint that says FP8 but stores a layer without scales (not listed as ignored) fails by name."""
    fp8_dir = write_fp8_config(tiny_model_dir("llama"), {"quant_method": "fp8", "activation_scheme": "dynamic"},
                               tmp_path / "fp8")
    (Path(fp8_dir) / "model.safetensors").symlink_to(Path(tiny_model_dir("llama")) / "model.safetensors")
    with pytest.raises(ValueError, match="missing .* weights: model.layers.0.mlp.down_proj.weight_scale"):
        get_model(ModelConfig.from_pretrained(fp8_dir, None), "auto", "cpu")
