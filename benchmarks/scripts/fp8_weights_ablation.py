"""Which projections' FP8 rounding costs the top-1 agreement, and whether finer scales recover it (issue 16).

    python benchmarks/scripts/fp8_weights_ablation.py --num-tokens 1000 \
        --output-json benchmarks/cpu/quantization/fp8-weights-ablation.json

Same method as ``fp8_accuracy.py`` (float32 on CPU, a greedy generation of the dense model read back
teacher-forced, argmaxes compared at each generated position), but the dense model's weights are rounded through
float8_e4m3fn in place, one set of projections at a time: all of them with one scale per output channel (what
``quantization="fp8"`` computes on CPU, checked against it: ``engine_fp8``), each kind of projection alone, and all
of them with one scale per group of input columns (finer than any FP8 checkpoint format uses: it only shows
whether the scale's granularity matters).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp8_accuracy as accuracy  # noqa: E402

from pagedllm.config import ModelConfig  # noqa: E402
from pagedllm.model.loader import get_model  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def round_weight(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Through FP8 with one scale per output channel, or per group of ``group_size`` input columns."""
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // group_size, group_size) if group_size else weight
    scale = grouped.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return ((grouped / scale).to(FP8).float() * scale).reshape(rows, cols)


def variants(group_size: int) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """name -> (projection kinds rounded, group size or None for per channel)."""
    return {"all, per channel": (KINDS, None),
            **{f"{kind} only": ((kind,), None) for kind in KINDS},
            f"all, per {group_size} input columns": (KINDS, group_size)}


@torch.no_grad()
def ablate(model: torch.nn.Module, reference: torch.Tensor, sequence: list[int], generated: slice,
           group_size: int) -> dict:
    """Each variant's agreement with ``reference`` (the dense model's logits), the dense ``model``'s projection
    weights rounded in place per variant."""
    dense_weights = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("proj.weight")}
    results = {}
    for name, (kinds, groups) in variants(group_size).items():
        for param_name, param in model.named_parameters():
            if param_name in dense_weights:
                rounded = any(f".{kind}." in param_name for kind in kinds)
                param.copy_(round_weight(dense_weights[param_name], groups) if rounded else dense_weights[param_name])
        logits = accuracy.teacher_forced_logits(model, sequence)[generated]
        results[name] = summarize(accuracy.compare(reference, logits))
        print(f"  {name}: {results[name]['top1_agreement']:.4f}", flush=True)
    return results


def summarize(comparison: dict) -> dict:
    return {key: comparison[key] for key in ("top1_agreement", "num_disagreements", "mean_kl")}


def evaluate(name: str, model_dir: str, ids: list[int], num_tokens: int, group_size: int) -> dict:
    """The engine's FP8 model and the ablation variants against the dense model, over ``num_tokens`` generated
    tokens (fewer where the model's context is shorter)."""
    sequence, generated = accuracy.dense_generation(model_dir, ids, num_tokens)
    engine_fp8 = get_model(ModelConfig.from_pretrained(model_dir, None, dtype="float32", quantization="fp8"),
                           "auto", "cpu")
    dense = get_model(ModelConfig.from_pretrained(model_dir, None, dtype="float32"), "auto", "cpu")
    reference = accuracy.teacher_forced_logits(dense, sequence)[generated]
    engine = summarize(accuracy.compare(reference, accuracy.teacher_forced_logits(engine_fp8, sequence)[generated]))
    print(f"{name}: engine fp8 {engine['top1_agreement']:.4f}", flush=True)
    return {"model": name, "prompt_tokens": len(ids), "generated_tokens": len(sequence) - len(ids),
            "engine_fp8": engine, "variants": ablate(dense, reference, sequence, generated, group_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tokens", type=int, default=1000)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="fp8-ablation-") as tmp:
        from pagedllm.entrypoints.default_model import default_model_path

        gguf = default_model_path()
        # name -> (model directory, GGUF the tokenizer comes from, a group size that divides every projection's K)
        models = {"stories260K": (str(accuracy.STORIES), None, 4),
                  "SmolLM2-135M": (accuracy.gguf_as_safetensors(gguf, Path(tmp) / "smollm2"), gguf, 32)}
        for name, (model_dir, gguf_path, group_size) in models.items():
            ids = accuracy.prompt_ids(name, model_dir, gguf_path)
            records.append(evaluate(name, model_dir, ids, args.num_tokens, group_size))
    result = {"bench": "fp8-weights-ablation", "device": "cpu", "dtype": "float32",
              "command": " ".join(["python", *sys.argv]), "platform": platform.platform(),
              "torch": torch.__version__, "seconds": round(time.perf_counter() - start), "results": records}
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
