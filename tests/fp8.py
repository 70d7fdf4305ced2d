"""FP8 KV cache test helpers: an exact float -> FP8 cast for Triton's interpreter, and FP8 caches filled from float.

Triton's interpreter (the CPU stand-in for the GPU in these tests) rounds float -> FP8 wrongly: it rounds half up
without carrying a mantissa overflow into the exponent, so 1.95 becomes 1.0 in e4m3 (the GPU's cvt, like torch,
rounds to nearest even and gives 2.0). ``exact_fp8_casts`` swaps in torch's cast for those conversions while a
test runs, so the kernels' own logic is compared with the torch oracle byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pagedllm.attention.kv_quant import quantize_kv

FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
_TRITON_TO_TORCH_FP8 = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}


def _as_float32(data: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "fp32":
        return data.view(np.float32)
    if dtype_name == "fp16":
        return data.view(np.float16).astype(np.float32)
    # bf16: the high half of a float32
    return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


@pytest.fixture
def exact_fp8_casts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Float -> FP8 casts in Triton's interpreter through torch (round to nearest even), for one test."""
    if torch.cuda.is_available():
        yield
        return
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        target = _TRITON_TO_TORCH_FP8.get(output_dtype.name)
        if target is None or input_dtype.name not in ("fp32", "fp16", "bf16"):
            return original(data, input_dtype, output_dtype, rounding_mode)
        values = torch.from_numpy(np.ascontiguousarray(_as_float32(np.asarray(data), input_dtype.name)))
        return values.to(target).view(torch.uint8).numpy()

    monkeypatch.setattr(interpreter, "_convert_float", convert)
    yield


def power_of_two_scale(x: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """A scale near max |x| / FP8 max that is a power of two: dividing by it is exact on every device (the GPU's
    division and torch's then agree bit for bit), so the stored bytes can be compared exactly."""
    ideal = x.abs().amax().float() / torch.finfo(fp8_dtype).max
    return torch.exp2(torch.ceil(torch.log2(ideal))).to(torch.float32)


def quantized_copy(cache: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                   fp8_dtype: torch.dtype) -> torch.Tensor:
    """A float cache [2, ...] as an FP8 cache holding K / k_scale and V / v_scale."""
    return torch.stack([quantize_kv(cache[0], k_scale, fp8_dtype), quantize_kv(cache[1], v_scale, fp8_dtype)])
