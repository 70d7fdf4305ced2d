"""The fused Triton kernels of ``model/triton_ops.py`` against the torch path of ``model/layers.py``.

Without CUDA the kernels run in Triton's interpreter on CPU tensors in float32; with CUDA they run compiled in
bfloat16, float16 and float32. The reference is always the production torch code (dispatch forced off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before triton was first imported.
triton_ops = pytest.importorskip("pagedllm.model.triton_ops")
skinny = pytest.importorskip("pagedllm.model.skinny_gemm")

from pagedllm.attention.torch_paged import write_kv_cache
from pagedllm.config import ModelConfig
from pagedllm.model import layers
from pagedllm.model.layers import RMSNorm, RotaryEmbedding, RotaryStep, SiluAndMul, rotate_qk
from pagedllm.model.loader import get_model
from tests.utils import PagedRunner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else [torch.float32]
# One rounding step of the dtype, relative (results near 1 in magnitude); float32 differs only by summation order.
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the layers' plain torch code even on CUDA: the reference every kernel is compared with."""
    monkeypatch.setattr(layers, "use_triton_ops", lambda x: False)
    yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def random_norm(hidden_size: int, dtype: torch.dtype, eps: float = 1e-6) -> RMSNorm:
    norm = RMSNorm(hidden_size, eps).to(DEVICE, dtype)
    norm.weight.data = (0.5 + torch.rand(hidden_size, device=DEVICE)).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_rows", "hidden_size"), [(1, 896), (7, 1536), (3, 3584), (2, 4096), (5, 37)])
def test_rms_norm(torch_path: None, dtype: torch.dtype, num_rows: int, hidden_size: int) -> None:
    norm = random_norm(hidden_size, dtype, eps=1e-5)
    x = (3 * torch.randn(num_rows, hidden_size, device=DEVICE)).to(dtype)
    x_before = x.clone()
    assert_close(triton_ops.rms_norm(x, norm.weight, norm.eps), norm(x))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_rows", "hidden_size"), [(1, 896), (9, 1536), (4, 3584), (3, 100)])
def test_fused_add_rms_norm(torch_path: None, dtype: torch.dtype, num_rows: int, hidden_size: int) -> None:
    norm = random_norm(hidden_size, dtype)
    x = torch.randn(num_rows, hidden_size, device=DEVICE).to(dtype)
    residual = (4 * torch.randn(num_rows, hidden_size, device=DEVICE)).to(dtype)
    inputs_before = (x.clone(), residual.clone())
    normed, new_residual = triton_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    expected_normed, expected_residual = norm(x, residual)
    assert torch.equal(new_residual, expected_residual)  # one rounding of the same sum: bit-exact
    assert_close(normed, expected_normed)
    assert torch.equal(x, inputs_before[0]) and torch.equal(residual, inputs_before[1])


def test_rms_norm_strided_rows_and_3d(torch_path: None) -> None:
    """Rows of a wider buffer (a strided view) and a [T, H, D] input, as Qwen3's per-head norm has."""
    norm = random_norm(64, torch.float32)
    wide = torch.randn(6, 200, device=DEVICE)
    assert_close(triton_ops.rms_norm(wide[:, 10:74], norm.weight, norm.eps), norm(wide[:, 10:74]))
    heads = torch.randn(5, 3, 64, device=DEVICE)
    assert_close(triton_ops.rms_norm(heads, norm.weight, norm.eps), norm(heads))


def qkv_views(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the model makes them: strided views into one fused qkv projection output."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (2 * torch.randn(num_tokens, q_size + 2 * kv_size, device=DEVICE)).to(dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)


ROTARY_SHAPES = [  # (tokens, q heads, kv heads, head_dim)
    (1, 14, 2, 64),
    (5, 4, 2, 128),
    (3, 7, 1, 128),
    (6, 3, 3, 32),
    (2, 5, 5, 96),  # head_dim not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("shape", ROTARY_SHAPES)
def test_rotary_qk(torch_path: None, dtype: torch.dtype, with_norm: bool, shape: tuple[int, int, int, int]) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim = shape
    max_position = 4096
    rotary = RotaryEmbedding(head_dim, max_position, base=1e6).to(DEVICE)
    positions = torch.randint(0, max_position, (num_tokens,), device=DEVICE)
    positions[0] = max_position - 1  # the last row of the cache is reachable
    q, k = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    q_norm, k_norm = (random_norm(head_dim, dtype), random_norm(head_dim, dtype)) if with_norm else (None, None)
    inputs_before = (q.clone(), k.clone())

    gathered = RotaryStep(positions, *rotary(positions, dtype), is_gathered=True)
    expected_q, expected_k = rotate_qk(q, k, gathered, q_norm, k_norm)
    weights = (q_norm.weight, k_norm.weight, q_norm.eps) if with_norm else ()
    actual_q, actual_k = triton_ops.rotary_qk(q, k, positions, rotary.cos_cache, rotary.sin_cache, *weights)

    assert_close(actual_q, expected_q)
    assert_close(actual_k, expected_k)
    assert actual_q.is_contiguous() and actual_k.is_contiguous()
    assert torch.equal(q, inputs_before[0]) and torch.equal(k, inputs_before[1])


class RotaryStoreCase:
    """Inputs of the fused rotary + K/V store kernel: q and k as strided views of one qkv output, v, optional
    per-head norms, and a slot mapping whose last token is CUDA-graph padding (slot -1)."""

    BLOCK_SIZE, NUM_BLOCKS = 4, 8

    def __init__(self, rotary, positions, q, k, v, q_norm, k_norm, slots) -> None:
        self.rotary, self.positions, self.q, self.k, self.v = rotary, positions, q, k, v
        self.q_norm, self.k_norm, self.slots = q_norm, k_norm, slots

    @classmethod
    def random(cls, shape: tuple[int, int, int, int], dtype: torch.dtype, with_norm: bool) -> RotaryStoreCase:
        num_tokens, num_heads, num_kv_heads, head_dim = shape
        rotary = RotaryEmbedding(head_dim, 512, base=1e6).to(DEVICE)
        positions = torch.randint(0, 512, (num_tokens,), device=DEVICE)
        q, k = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
        v = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
        norms = (random_norm(head_dim, dtype), random_norm(head_dim, dtype)) if with_norm else (None, None)
        slots = torch.randperm(cls.NUM_BLOCKS * cls.BLOCK_SIZE, device=DEVICE)[:num_tokens]
        slots[-1] = -1 if num_tokens > 1 else slots[-1]  # a CUDA-graph padding token
        return cls(rotary, positions, q, k, v, *norms, slots)

    @property
    def cache_shape(self) -> tuple[int, ...]:
        return (2, self.NUM_BLOCKS, self.BLOCK_SIZE, *self.v.shape[1:])

    def expected_rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated (and normed) by the torch path."""
        gathered = RotaryStep(self.positions, *self.rotary(self.positions, self.q.dtype), is_gathered=True)
        return rotate_qk(self.q, self.k, gathered, self.q_norm, self.k_norm)

    def kernel_args(self) -> tuple:
        """``rotary_qk_store_kv``'s arguments up to the cache."""
        norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm else (None, None, 1e-6)
        return (self.q, self.k, self.v, self.positions, self.rotary.cos_cache, self.rotary.sin_cache, *norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("shape", ROTARY_SHAPES)
def test_rotary_qk_store_kv(torch_path: None, dtype: torch.dtype, with_norm: bool,
                            shape: tuple[int, int, int, int]) -> None:
    """Rotary with the K/V store fused in, against rotate_qk + the torch backend's cache write: the same q, the
    same cache bytes, and padding tokens (slot -1) leave the cache alone."""
    case = RotaryStoreCase.random(shape, dtype, with_norm)
    cache = torch.randn(case.cache_shape, device=DEVICE).to(dtype)
    expected_cache = cache.clone()

    expected_q, expected_k = case.expected_rotation()
    is_real = case.slots >= 0
    write_kv_cache(expected_k[is_real], case.v[is_real], expected_cache, case.slots[is_real])
    actual_q = triton_ops.rotary_qk_store_kv(*case.kernel_args(), cache, case.slots)

    assert_close(actual_q, expected_q)
    assert_close(cache, expected_cache)
    assert torch.equal(cache[1], expected_cache[1])  # V is copied, not computed


def test_rotary_store_kv_ignores_tokens_past_the_slot_mapping() -> None:
    """A slot mapping shorter than the batch (as the torch backend allows) stores only the tokens it covers."""
    rotary = RotaryEmbedding(16, 64, base=1e4).to(DEVICE)
    q, k = qkv_views(3, 2, 1, 16, torch.float32)
    v = torch.randn(3, 1, 16, device=DEVICE)
    cache = torch.zeros(2, 4, 4, 1, 16, device=DEVICE)
    triton_ops.rotary_qk_store_kv(q, k, v, torch.tensor([0, 1, 2], device=DEVICE), rotary.cos_cache,
                                  rotary.sin_cache, None, None, 1e-6, cache, torch.tensor([5, 9], device=DEVICE))
    written = cache.flatten(1, 2).flatten(2).ne(0).any(-1)  # [2, slots]
    assert written.sum(-1).tolist() == [2, 2] and written[:, [5, 9]].all()


def test_rotary_step_takes_the_kernel_path_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    rotary = RotaryEmbedding(32, 64, base=1e4).to(DEVICE)
    positions = torch.tensor([0, 5, 63], device=DEVICE)
    monkeypatch.setattr(layers, "use_triton_ops", lambda x: True)
    fused = rotary.step_inputs(positions, torch.float32)
    assert not fused.is_gathered and fused.cos is rotary.cos_cache
    monkeypatch.setattr(layers, "use_triton_ops", lambda x: False)
    gathered = rotary.step_inputs(positions, torch.float32)
    assert gathered.is_gathered and gathered.cos.shape == (3, 1, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_rows", "d"), [(1, 896), (4, 4864), (3, 37), (2, 1025)])
def test_silu_and_mul(torch_path: None, dtype: torch.dtype, num_rows: int, d: int) -> None:
    x = (3 * torch.randn(num_rows, 2 * d, device=DEVICE)).to(dtype)
    assert_close(triton_ops.silu_and_mul(x), SiluAndMul()(x))


def test_silu_and_mul_strided_and_3d(torch_path: None) -> None:
    wide = torch.randn(4, 300, device=DEVICE)
    assert_close(triton_ops.silu_and_mul(wide[:, :90]), SiluAndMul()(wide[:, :90]))
    batched = torch.randn(2, 3, 40, device=DEVICE)
    assert_close(triton_ops.silu_and_mul(batched), SiluAndMul()(batched))


def test_empty_batch() -> None:
    """No tokens (nothing to launch) still gives correctly shaped outputs."""
    weight = torch.ones(48, device=DEVICE)
    assert triton_ops.rms_norm(torch.empty(0, 48, device=DEVICE), weight, 1e-6).shape == (0, 48)
    normed, residual = triton_ops.fused_add_rms_norm(
        torch.empty(0, 48, device=DEVICE), torch.empty(0, 48, device=DEVICE), weight, 1e-6)
    assert normed.shape == residual.shape == (0, 48)
    assert triton_ops.silu_and_mul(torch.empty(0, 48, device=DEVICE)).shape == (0, 24)
    cache = torch.zeros(8, 8, device=DEVICE)
    q, k = triton_ops.rotary_qk(torch.empty(0, 2, 16, device=DEVICE), torch.empty(0, 1, 16, device=DEVICE),
                                torch.empty(0, dtype=torch.long, device=DEVICE), cache, cache)
    assert q.shape == (0, 2, 16) and k.shape == (0, 1, 16)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_whole_model_through_the_kernels(tiny_model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch,
                                         arch: str, attention: str) -> None:
    """A tiny model's prefill and decode steps with every fused op dispatched to the kernels (on CPU: in the
    interpreter): the norms and the activation inside the GEMMs, the post-attention norm in the o projection's
    epilogue, the K/V store inside rotary, and with the Triton attention backend rotary inside its decode kernel,
    give the torch path's logits: the wiring in llama.py passes the right tensors."""
    config = ModelConfig.from_pretrained(tiny_model_dir(arch), None, dtype="float32")
    ids = torch.randint(3, 128, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setattr(layers, "FUSE_NORM_INTO_OUTPUT", True)

    def run(fused: bool) -> torch.Tensor:
        model = get_model(config, "auto", DEVICE, attention if fused else "torch")
        monkeypatch.setattr(layers, "use_triton_ops", lambda x: fused)
        # The fused skinny GEMMs (norm and activation in the prologue, norm in the epilogue) too, for every step of
        # at most 16 tokens.
        decode_sized = lambda x, weight: skinny if fused and x.numel() <= 16 * x.shape[-1] else None  # noqa: E731
        monkeypatch.setattr(layers, "fused_gemm_kernels", decode_sized)
        monkeypatch.setattr(layers, "skinny_gemm_for", decode_sized)
        runner = PagedRunner(model, block_size=4)
        return torch.cat([runner.step([("a", ids[:9])]), runner.step([("a", ids[9:10])]),
                          runner.step([("a", ids[10:])])])

    torch.testing.assert_close(run(fused=True), run(fused=False), atol=1e-4, rtol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_ops_replay_in_a_cuda_graph(torch_path: None) -> None:
    """Captured once, replayed on new inputs written into the same buffers: no host sync, no stale shapes."""
    dtype, num_tokens, hidden_size, head_dim = torch.bfloat16, 4, 896, 64
    norm, q_norm, k_norm = (random_norm(n, dtype) for n in (hidden_size, head_dim, head_dim))
    rotary = RotaryEmbedding(head_dim, 512, base=1e6).to(DEVICE)
    x = torch.randn(num_tokens, hidden_size, device=DEVICE, dtype=dtype)
    residual = torch.randn_like(x)
    positions = torch.zeros(num_tokens, dtype=torch.long, device=DEVICE)
    q, k = qkv_views(num_tokens, 14, 2, head_dim, dtype)

    def step() -> tuple[torch.Tensor, ...]:
        normed, new_residual = triton_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
        rotated = triton_ops.rotary_qk(q, k, positions, rotary.cos_cache, rotary.sin_cache,
                                       q_norm.weight, k_norm.weight, q_norm.eps)
        return normed, new_residual, *rotated, triton_ops.silu_and_mul(x)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    for buffer in (x, residual, q, k):
        buffer.copy_(torch.randn(buffer.shape, device=DEVICE))
    positions.copy_(torch.tensor([3, 100, 511, 7]))
    graph.replay()
    for actual, expected in zip(outputs, step(), strict=True):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize(("value", "is_disabled"), [(None, False), ("0", False), ("", False), ("1", True)])
def test_env_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, is_disabled: bool) -> None:
    from pagedllm.config import triton_ops_disabled_by_env

    if value is None:
        monkeypatch.delenv("PAGEDLLM_DISABLE_TRITON_OPS", raising=False)
    else:
        monkeypatch.setenv("PAGEDLLM_DISABLE_TRITON_OPS", value)
    assert triton_ops_disabled_by_env() is is_disabled
