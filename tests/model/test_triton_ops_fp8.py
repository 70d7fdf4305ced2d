"""The fused rotary + KV store kernel (``triton_ops.rotary_qk_store_kv``) writing an FP8 cache, against rotate_qk
and the torch backend's quantizing store; and a tiny model over an FP8 cache with the kernels against the torch path.

Without CUDA the kernels run in Triton's interpreter, float -> FP8 casts through torch (tests/fp8.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before triton was first imported.
triton_ops = pytest.importorskip("pagedllm.model.triton_ops")

from pagedllm.attention.kv_quant import dequantize_kv
from pagedllm.attention.torch_paged import write_kv_cache
from pagedllm.config import ModelConfig
from pagedllm.model import layers
from pagedllm.model.loader import get_model
from tests.fp8 import FP8_DTYPES, exact_fp8_casts, power_of_two_scale  # noqa: F401 (fixture)
from tests.model.test_triton_ops import (  # noqa: F401 (torch_path: a fixture)
    DEVICE,
    DTYPES,
    ROTARY_SHAPES,
    RotaryStoreCase,
    torch_path,
)
from tests.utils import PagedRunner


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("shape", ROTARY_SHAPES[:3])
def test_rotary_qk_store_kv_quantizes_like_the_backend_store(torch_path: None, exact_fp8_casts: None,
                                                             fp8_dtype: torch.dtype, dtype: torch.dtype,
                                                             with_norm: bool, shape: tuple[int, int, int, int]) -> None:
    case = RotaryStoreCase.random(shape, dtype, with_norm)
    cache = torch.zeros(case.cache_shape, device=DEVICE, dtype=fp8_dtype)
    expected_cache = cache.clone()
    k_scale = power_of_two_scale(3 * case.k.float(), fp8_dtype).to(DEVICE)  # rotation and norm may grow |k| a little
    v_scale = power_of_two_scale(case.v.float(), fp8_dtype).to(DEVICE)

    expected_q, expected_k = case.expected_rotation()
    is_real = case.slots >= 0
    write_kv_cache(expected_k[is_real], case.v[is_real], expected_cache, case.slots[is_real], k_scale, v_scale)
    actual_q = triton_ops.rotary_qk_store_kv(*case.kernel_args(), cache, case.slots, k_scale, v_scale)

    torch.testing.assert_close(actual_q, expected_q, atol=2e-2, rtol=2e-2)
    # V is quantized from the same values: the same bytes. K is rotated in another order than torch's, so a value
    # at a rounding boundary may land one FP8 step away: compare dequantized, and nearly all bytes.
    assert torch.equal(cache[1].view(torch.uint8), expected_cache[1].view(torch.uint8))
    step = 2**-2 if fp8_dtype == torch.float8_e5m2 else 2**-3
    torch.testing.assert_close(dequantize_kv(cache[0], k_scale, torch.float32),
                               dequantize_kv(expected_cache[0], k_scale, torch.float32),
                               rtol=step, atol=k_scale.item() * 2**-6)
    assert (cache[0].view(torch.uint8) != expected_cache[0].view(torch.uint8)).float().mean() < 0.02


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_whole_model_over_an_fp8_cache_through_the_kernels(tiny_model_dir: Callable[[str], str],
                                                             monkeypatch: pytest.MonkeyPatch, exact_fp8_casts: None,
                                                             arch: str) -> None:
    """A tiny model's prefill and decode steps over an FP8 cache, with rotary + the quantizing K/V store fused (on
    CPU: in the interpreter), give the torch path's logits: llama.py hands the layer's scales to both stores and
    to the attention backend."""
    config = ModelConfig.from_pretrained(tiny_model_dir(arch), None, dtype="float32")
    model = get_model(config, "auto", DEVICE)
    for layer in model.model.layers:  # scales as a checkpoint would set them (powers of two: exact divisions)
        layer.self_attn.k_scale.fill_(2.0**-6)
        layer.self_attn.v_scale.fill_(2.0**-7)
    ids = torch.randint(3, 128, (11,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(layers, "use_triton_ops", lambda x: fused)
        runner = PagedRunner(model, block_size=4, kv_cache_dtype=torch.float8_e4m3fn)
        return torch.cat([runner.step([("a", ids[:9])]), runner.step([("a", ids[9:10])]),
                          runner.step([("a", ids[10:])])])

    expected, actual = run(fused=False), run(fused=True)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(actual, expected, atol=5e-2, rtol=5e-2)
