"""FP8-weight models on CPU against HF transformers run on the dequantized dense weights (float32).

Checkpoints: compressed-tensors FP8 written by the compressed-tensors library (per-channel and per-tensor weight
scales; dynamic per-token / per-tensor and static activations; layers ignored by name and by regex), an AutoFP8-style
``quant_method: "fp8"`` one written with torch, and ``quantization="fp8"`` on a dense checkpoint (online). On CPU the
FP8 layers dequantize (the oracle path), so pagedllm must match the dequantized reference to float32 rounding and
greedy generation must match token for token.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("compressed_tensors")

from pagedllm.config import ModelConfig
from pagedllm.entrypoints.llm import LLM
from pagedllm.model.linear import Linear
from pagedllm.model.loader import get_model
from pagedllm.model.quantization.fp8 import Fp8LinearMethod
from pagedllm.model.quantization.fp8_gemm import quantize_weight
from pagedllm.model.quantization.unquantized import UnquantizedLinearMethod
from pagedllm.params import SamplingParams
from tests.model.quantization.fp8_checkpoints import (
    dequantized_state_dict,
    write_autofp8,
    write_compressed_tensors_fp8,
    write_dequantized,
)
from tests.utils import PagedRunner, load_hf_model

ATOL = 1e-4
CT_VARIANTS = [  # (weight strategy, activations, extra ignore entries)
    ("channel", "dynamic_token", []),
    ("tensor", "static", []),
    ("tensor", "dynamic_tensor", ["re:.*down_proj"]),
    ("channel", "none", ["model.layers.1.self_attn.o_proj"]),
]


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def load(model_dir: str, **kwargs) -> torch.nn.Module:
    return get_model(ModelConfig.from_pretrained(model_dir, None, dtype="float32", **kwargs), "auto", "cpu")


def assert_matches_hf(model: torch.nn.Module, reference_dir: str) -> None:
    """Whole-prompt, then chunked prefill and decode logits equal HF's on the reference checkpoint."""
    hf = load_hf_model(reference_dir)
    ids = prompt(23, seed=3)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    runner = PagedRunner(model, block_size=4)
    logits = torch.cat([runner.step([("a", ids[:9])]), *(runner.step([("a", [t])]) for t in ids[9:])])
    assert expected.std() > 0.5
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def linear_methods(model: torch.nn.Module) -> dict[str, type]:
    return {name: type(m.quant_method) for name, m in model.named_modules() if isinstance(m, Linear)}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
@pytest.mark.parametrize(("strategy", "activations", "ignore"), CT_VARIANTS)
def test_compressed_tensors_fp8_matches_dequantized_hf(tiny_model_dir: Callable[[str], str], tmp_path: Path,
                                                       arch: str, strategy: str, activations: str,
                                                       ignore: list[str]) -> None:
    fp8_dir = write_compressed_tensors_fp8(tiny_model_dir(arch), tmp_path / "fp8", strategy, activations, ignore)
    model = load(fp8_dir)
    methods = linear_methods(model)
    ignored = [name for name, method in methods.items() if method is UnquantizedLinearMethod]
    if not ignore:  # targets ["Linear"] reach every projection of the model
        assert not ignored and all(method is Fp8LinearMethod for method in methods.values())
    elif ignore[0].startswith("re:"):
        assert ignored == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    else:
        assert ignored == ["model.layers.1.self_attn.o_proj"]
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.output_size,)
    assert (qkv.input_scale is not None) == (activations == "static")
    assert_matches_hf(model, write_dequantized(fp8_dir, tmp_path / "dense"))


def test_naive_quantized_format_loads(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    fp8_dir = write_compressed_tensors_fp8(tiny_model_dir("llama"), tmp_path / "fp8", fmt="naive-quantized")
    assert json.loads((Path(fp8_dir) / "config.json").read_text())["quantization_config"]["format"] == \
        "naive-quantized"
    assert_matches_hf(load(fp8_dir), write_dequantized(fp8_dir, tmp_path / "dense"))


def test_fused_layer_equals_its_dequantized_parts(tiny_model_dir: Callable[[str], str], tmp_path: Path) -> None:
    """Per-tensor scales differ per q/k/v shard: each shard's rows keep their own scale."""
    fp8_dir = write_compressed_tensors_fp8(tiny_model_dir("qwen3"), tmp_path / "fp8", "tensor", "static")
    model = load(fp8_dir)
    dense = dequantized_state_dict(fp8_dir)
    prefix = "model.layers.1.self_attn"
    weight = torch.cat([dense[f"{prefix}.{part}.weight"] for part in ("q_proj", "k_proj", "v_proj")])
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert len(set(qkv.weight_scale.tolist())) == 3
    x = torch.randn(5, qkv.input_size)
    torch.testing.assert_close(qkv(x), x @ weight.T, atol=1e-5, rtol=1e-5)
    scales = load_file(str(Path(fp8_dir) / "model.safetensors"))
    expected_input_scale = max(scales[f"{prefix}.{p}.input_scale"].item() for p in ("q_proj", "k_proj", "v_proj"))
    assert qkv.input_scale.item() == expected_input_scale


@pytest.mark.parametrize("activation_scheme", ["static", "dynamic"])
def test_autofp8_checkpoint_matches_dequantized_hf(tiny_model_dir: Callable[[str], str], tmp_path: Path,
                                                   activation_scheme: str) -> None:
    fp8_dir = write_autofp8(tiny_model_dir("llama"), tmp_path / "fp8", activation_scheme)
    model = load(fp8_dir)
    assert ModelConfig.from_pretrained(fp8_dir, None).quantization == "fp8"
    assert all(method is Fp8LinearMethod for method in linear_methods(model).values())
    assert_matches_hf(model, write_dequantized(fp8_dir, tmp_path / "dense"))


def write_online_reference(dense_dir: str, out_dir: Path) -> str:
    """The dense checkpoint with every projection replaced by its per-channel FP8 round trip (what online FP8
    computes), for HF."""
    shutil.copytree(dense_dir, out_dir)
    tensors = load_file(str(out_dir / "model.safetensors"))
    for name, tensor in tensors.items():
        if name.endswith("_proj.weight"):
            weight, scale = quantize_weight(tensor)
            tensors[name] = weight.float() * scale[:, None]
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return str(out_dir)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_online_fp8_quantizes_each_channel(tiny_model_dir: Callable[[str], str], tmp_path: Path, arch: str) -> None:
    model = load(tiny_model_dir(arch), quantization="fp8")
    layer = model.model.layers[0].mlp.gate_up_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (layer.output_size,)
    assert layer.input_scale is None and layer.quant_method.scheme.activations == "dynamic_token"
    assert_matches_hf(model, write_online_reference(tiny_model_dir(arch), tmp_path / "ref"))


def test_online_fp8_on_bfloat16_stays_close_to_dense(tiny_model_dir: Callable[[str], str]) -> None:
    config = ModelConfig.from_pretrained(tiny_model_dir("qwen3"), None, dtype="bfloat16", quantization="fp8")
    fp8 = get_model(config, "auto", "cpu")
    dense = get_model(ModelConfig.from_pretrained(tiny_model_dir("qwen3"), None, dtype="bfloat16"), "auto", "cpu")
    ids = prompt(40, seed=4)
    a, b = PagedRunner(fp8).step([("a", ids)]), PagedRunner(dense).step([("a", ids)])
    assert fp8.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    assert ((a - b).norm() / b.norm()).item() < 0.1
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def greedy_hf(reference_dir: str, ids: list[int], num_tokens: int) -> list[int]:
    hf = load_hf_model(reference_dir)
    ids = list(ids)
    with torch.no_grad():
        for _ in range(num_tokens):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-num_tokens:]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_generation_matches_hf(tiny_model_dir: Callable[[str], str], tmp_path: Path, arch: str) -> None:
    """Through the engine (batched with other requests): the same greedy tokens as HF on the dequantized weights."""
    fp8_dir = write_compressed_tensors_fp8(tiny_model_dir(arch), tmp_path / "fp8", "channel", "dynamic_token")
    reference = write_dequantized(fp8_dir, tmp_path / "dense")
    llm = LLM(fp8_dir, device="cpu", dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22)
    prompts = [prompt(11, seed=5), prompt(6, seed=6), prompt(17, seed=7)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for ids, output in zip(prompts, outputs):
        assert list(output.outputs[0].token_ids) == greedy_hf(reference, ids, 12)


@pytest.mark.parametrize("quantized", ["compressed-tensors", "online"])
def test_dummy_weights(tiny_model_dir: Callable[[str], str], tmp_path: Path, quantized: str) -> None:
    if quantized == "online":
        config = ModelConfig.from_pretrained(tiny_model_dir("llama"), None, quantization="fp8")
    else:
        fp8_dir = write_compressed_tensors_fp8(tiny_model_dir("llama"), tmp_path / "fp8", "tensor", "static")
        config = ModelConfig.from_pretrained(fp8_dir, None)
    model = get_model(config, "dummy", "cpu")
    layer = model.model.layers[1].self_attn.qkv_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.isfinite(layer.weight_scale).all()
    logits = PagedRunner(model).step([("a", prompt(9, seed=8))])
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_engine_reports_quantized_weight_memory(tiny_model_dir: Callable[[str], str]) -> None:
    def report(**kwargs) -> dict:
        llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", skip_tokenizer_init=True,
                  kv_cache_memory_bytes=1 << 22, **kwargs)
        return llm.llm_engine.engine_core.startup_report

    dense, fp8 = report(), report(quantization="fp8")
    assert fp8["quantization"] == "fp8" and dense["quantization"] is None
    # The projections shrink 4x (float32 -> FP8, plus a scale per row); embeddings and LM head stay float32.
    assert fp8["weight_bytes"] < 0.75 * dense["weight_bytes"]
    assert fp8["kv_cache_tokens"] == dense["kv_cache_tokens"]  # a fixed byte budget on CPU


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_steps_with_norm_and_activation_inside_the_fp8_gemv(tiny_model_dir: Callable[[str], str],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   arch: str) -> None:
    """One-token steps route the RMSNorms and SiLU-and-mul into the FP8 GEMV's prologue (``fused_input_linear``;
    on CPU the kernels run in Triton's interpreter, as every fused op does here) and give the unfused path's
    logits: the wiring passes the right residual, norm weight and gate/up halves."""
    pytest.importorskip("pagedllm.model.quantization.fp8_gemv")
    from pagedllm.model import layers
    from pagedllm.model.quantization import fp8

    model = load(tiny_model_dir(arch), quantization="fp8")
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():  # distinct norm weights: a norm passed to the wrong projection would show
        if isinstance(module, layers.RMSNorm):
            module.weight.data = 1 + 0.2 * torch.randn(module.weight.shape, generator=generator)
    ids = prompt(12, seed=5)
    calls = []

    def run(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(layers, "use_triton_ops", lambda x: fused)
        monkeypatch.setattr(fp8, "gemv_fuses_input",  # the GEMV serves one row (CUDA and sm89+ aside)
                            lambda x, weight, scheme: calls.append(x.shape) or x.reshape(-1, x.shape[-1]).shape[0] == 1)
        runner = PagedRunner(model, block_size=4)
        return torch.cat([runner.step([("a", ids[:9])]), *(runner.step([("a", [t])]) for t in ids[9:])])

    fused = run(fused=True)
    assert len(calls) > 0
    torch.testing.assert_close(fused, run(fused=False), atol=1e-4, rtol=0)
