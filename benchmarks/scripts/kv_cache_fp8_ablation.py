"""Where an FP8 KV cache's top-1 disagreements come from, and what the known remedies recover (issue 16).

    python benchmarks/scripts/kv_cache_fp8_ablation.py --model ../shared/assets/models/stories260K \
        --output-json benchmarks/cpu/kv-cache-fp8/ablation-stories260k.json
    python benchmarks/scripts/kv_cache_fp8_ablation.py --output-json benchmarks/cpu/kv-cache-fp8/ablation-smollm2.json

Same method as ``kv_cache_fp8_accuracy.py`` (float32 model on CPU, a float32 cache generates the sequences, each
variant reads them teacher-forced and its top-1 is compared), but every variant runs on the float32 cache, with
the K/V the torch backend stores rounded through float8_e4m3fn first in the variant's way. Rounding K alone or V
alone says which one costs the agreement; the other variants are the remedies the KV-quantization literature uses
for keys, each with V at the engine's per-layer scale:

- a per-token-and-head scale (each stored vector uses FP8's whole range: nothing falls into its subnormals);
- the per-channel mean of the layer's first keys subtracted before rounding (SmoothAttention / SageAttention:
  softmax ignores a constant added to every score of a query, so the mean need not be added back);
- a Hadamard rotation of the head dimension (QuaRot: q.k = Hq.Hk spreads an outlier channel over all of them),
  with the mean and the per-token scale.

The simulation adds the mean and the rotation back after rounding, which gives the same scores as storing the
transformed keys and transforming the queries too. Its first variant is what the engine's FP8 cache computes,
checked against the engine itself (``engine_fp8_cache``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_cache_fp8_accuracy as accuracy  # noqa: E402

import pagedllm.attention.torch_paged as torch_paged  # noqa: E402
from pagedllm import LLM  # noqa: E402
from pagedllm.entrypoints.default_model import model_or_default  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def round_per_tensor(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Through FP8 with one scale for the whole tensor (by default, its own max)."""
    scale = x.abs().amax().clamp_min(1e-12) / FP8_MAX if scale is None else scale
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


def round_per_vector(x: torch.Tensor) -> torch.Tensor:
    """Through FP8 with one scale per token and head."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (x / scale).to(FP8).float() * scale


def hadamard(size: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of a power-of-two size."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / matrix.shape[0] ** 0.5


class KeyTransform:
    """Rounds a layer's keys through FP8: optionally rotated, minus the channel means of the layer's first step,
    with a per-step or per-vector scale."""

    def __init__(self, rotate: bool, smooth: bool, per_vector: bool) -> None:
        self.rotate, self.smooth, self.per_vector = rotate, smooth, per_vector
        self.means: dict[int, torch.Tensor] = {}  # cache tensor id -> that layer's channel means

    def __call__(self, key: torch.Tensor, layer: int) -> torch.Tensor:
        rotation = hadamard(key.shape[-1]) if self.rotate else None
        x = key @ rotation if rotation is not None else key
        mean = self.means.setdefault(layer, x.mean(0, keepdim=True)) if self.smooth else 0.0
        x = (round_per_vector if self.per_vector else round_per_tensor)(x - mean) + mean
        return x @ rotation.T if rotation is not None else x


def keep(x: torch.Tensor, layer: int) -> torch.Tensor:
    return x


class PerLayerScale:
    """Rounds through FP8 with the layer's scale taken from its first step (the engine's calculate_kv_scales)."""

    def __init__(self) -> None:
        self.scales: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return round_per_tensor(x, self.scales.setdefault(layer, x.abs().amax().clamp_min(1e-12) / FP8_MAX))


# name -> (key rounding, value rounding)
VARIANTS: dict[str, tuple[Callable, Callable]] = {
    "K and V, per-layer scale (the engine's fp8_e4m3)": (PerLayerScale(), PerLayerScale()),
    "K only": (PerLayerScale(), keep),
    "V only": (keep, PerLayerScale()),
    "K per token-and-head scale": (KeyTransform(False, False, True), PerLayerScale()),
    "K minus channel means": (KeyTransform(False, True, False), PerLayerScale()),
    "K minus channel means, per token-and-head scale": (KeyTransform(False, True, True), PerLayerScale()),
    "K Hadamard-rotated, minus channel means, per token-and-head scale":
        (KeyTransform(True, True, True), PerLayerScale()),
}


ENGINE_STORE = torch_paged.write_kv_cache  # the torch backend's own store, which the variants wrap


def install(key_rounding: Callable, value_rounding: Callable) -> None:
    """Make the torch backend store rounded keys and values (in the float32 cache)."""
    def rounded_store(key, value, kv_cache, slot_mapping, k_scale=None, v_scale=None):
        n, layer = slot_mapping.shape[0], kv_cache.data_ptr()
        key = key_rounding(key[:n].float(), layer).to(key.dtype)
        value = value_rounding(value[:n].float(), layer).to(value.dtype)
        ENGINE_STORE(key, value, kv_cache, slot_mapping, k_scale, v_scale)

    torch_paged.write_kv_cache = rounded_store


def main() -> None:
    args = accuracy.parse_args(__doc__)
    model = model_or_default(args.model)
    start = time.perf_counter()
    llm, sequences, first_generated, reference = accuracy.reference_run(model, args.max_tokens)
    record = {"model": str(args.model or "SmolLM2-135M-Instruct (default)"), "prompts": len(accuracy.PROMPTS),
              "max_tokens": args.max_tokens, "variants": {}}
    for name, (key_rounding, value_rounding) in VARIANTS.items():
        install(key_rounding, value_rounding)
        result = accuracy.agreement(reference, accuracy.teacher_forced(llm, sequences), first_generated)
        record["variants"][name] = result
        print(f"{name}: {result['top1_agreement']:.4f}", flush=True)
    torch_paged.write_kv_cache = ENGINE_STORE
    del llm
    engine_fp8 = LLM(model, **accuracy.ENGINE_KWARGS, kv_cache_dtype="fp8", calculate_kv_scales=True)
    record["engine_fp8_cache"] = accuracy.agreement(reference, accuracy.teacher_forced(engine_fp8, sequences),
                                                    first_generated)
    accuracy.write_record(record, start, args.output_json)


if __name__ == "__main__":
    main()
