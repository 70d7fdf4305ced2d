"""Batched sampling with per-request parameters.

One ``Sampler.__call__`` turns the logits of a step ``[B, V]`` into one token per row. ``SamplingMetadata.build``
gathers the rows' parameters into tensors once per step; a feature no row uses is ``None`` there, so its op is
skipped and costs nothing. Build is one cheap pass per parameter over the rows (list comprehensions, numpy for
the arithmetic), and its dense ``[B]`` arrays (temperature, seeds, top_k, ...) reach the device in ONE copy.

Order of operations (vLLM v1's):

1. logprobs are taken from the RAW logits (``log_softmax`` before any processing: vLLM's default "raw_logprobs");
2. logit_bias is added, then the min_tokens ban (eos + stop_token_ids -> -inf while a row has fewer than
   ``min_tokens`` outputs; after the bias, so a positive bias cannot lift the ban);
3. penalties: repetition (tokens seen in prompt or output: positive logits divided, negative multiplied),
   then frequency (minus ``penalty * count in output``) and presence (minus ``penalty`` if in output);
4. greedy rows take the argmax of these processed logits;
5. random rows: temperature, then min_p (relative to the most likely token, after temperature), then top_k,
   then top_p (on the distribution left by top_k), then a draw.

Randomness rule: the draw of a row depends only on ``(sampling_seed, len(output_token_ids))``, hashed into a 63-bit
generator seed (``generator_seed``). The token is ``argmax(p / E)`` over ``V`` Exponential(1) variables ``E`` (the
"exponential race", which picks token ``i`` with probability ``p_i``), computed in log space as
``argmax(logits - log E)``. So a seeded request gets the same tokens whatever else is in the batch, at any batch
position, and again after preemption and recompute, on the same kind of device. The noise comes from:

- CUDA: one Triton kernel for the whole batch (``triton_sampling.py``): each row's program draws counter-based
  Philox noise (``tl.rand(seed, column)``) and keeps a running argmax over the vocabulary, greedy rows included.
  When temperature is the only knob in use (the common case), it also divides by the temperature and reads the
  raw logits in their own dtype: one pass over the logits, no float32 copy; rows under a grammar are then drawn
  again from a masked float32 copy of just them. Otherwise the filters of step 5 run first in torch and the
  kernel only draws.
- CPU: a ``torch.Generator`` re-seeded per random row (one small kernel + ``manual_seed`` each: fine on CPU, but
  ~8 us of host time per row on a GPU, which is why CUDA does not use it).

The two devices produce different streams for the same seed; each is reproducible on its own.

Rows under a grammar are masked before the draw (``metadata.grammar_mask``), or drawn unmasked and checked after
it (``metadata.checked_rows``): for those the sampler also returns the ``NUM_DRAW_CANDIDATES`` tokens of best race
score, best first, from the same scores the draw maximized (``worker/grammar_sampling.py`` explains why the first
allowed one is the masked draw).

Ties: top_k keeps every token equal to the k-th largest logit (as vLLM), so ``top_k=1`` equals greedy unless the
top logits tie exactly.
"""

from __future__ import annotations

import importlib
import itertools
import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from pagedllm.core.interface import TopLogprobs
from pagedllm.params import SAMPLING_EPS, SamplingParams

_MASK64 = (1 << 64) - 1
# Exponential draws are clamped away from 0 so that log() stays finite: a -inf noise term would otherwise turn a
# banned (-inf) logit into nan, which argmax would pick.
_TINY = torch.finfo(torch.float32).tiny
# top_p stored for rows without top_p: the exclusive cumulative mass never reaches it, even with rounding.
_TOP_P_DISABLED = 2.0
# The best-scoring tokens of a row checked after its draw that the sampler returns, best first
# (``worker/grammar_sampling.py``).
NUM_DRAW_CANDIDATES = 16


@dataclass(slots=True)
class SamplingRow:
    """What the runner knows about one row of the batch."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far (before this step's sample), as far as the host knows
    sampling_seed: int  # randomness of this row depends only on (sampling_seed, num_output_tokens)
    # Tokens sampled before this step whose values are still on the device (async scheduling): counted, not known.
    num_pending_tokens: int = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending_tokens


def generator_seed(sampling_seed: int, num_output_tokens: int) -> int:
    """The seed of a row's generator at one output position: a 63-bit mix of the two numbers (splitmix64)."""
    return _splitmix64(_splitmix64(sampling_seed & _MASK64) ^ num_output_tokens) >> 1


def generator_seeds(sampling_seeds: list[int], nums_output_tokens: list[int]) -> np.ndarray:
    """``generator_seed`` of many rows at once, as [B] int64: the same splitmix64, in wrapping uint64 numpy math.

    A Python loop of ``generator_seed`` costs ~0.6 us per row: 150 us for 256 rows, every step.
    """
    try:
        seeds = np.array(sampling_seeds, dtype=np.int64).view(np.uint64)  # two's complement == ``& _MASK64``
    except OverflowError:  # a seed outside int64: reduce each modulo 2**64 first
        seeds = np.array([seed & _MASK64 for seed in sampling_seeds], dtype=np.uint64)
    counts = np.array(nums_output_tokens, dtype=np.uint64)
    return (_splitmix64_array(_splitmix64_array(seeds) ^ counts) >> np.uint64(1)).astype(np.int64)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class SparseTokens(NamedTuple):
    """(row, token) pairs, optionally with a value each: a sparse ``[B, V]`` update."""

    rows: torch.Tensor  # [K] int64
    tokens: torch.Tensor  # [K] int64
    values: torch.Tensor | None = None  # [K] float32


class GrammarMask(NamedTuple):
    """Token bitmasks of the constrained rows: bit ``t % 32`` of word ``t // 32`` of a row set = token t allowed."""

    rows: torch.Tensor  # [K] int64, rows of the batch under a grammar
    bitmask: torch.Tensor  # [K, ceil(V / 32)] int32


@dataclass
class PenaltyMetadata:
    """Penalty parameters per row, with the token occurrences they need (``None`` when no row uses that one)."""

    repetition: torch.Tensor | None  # [B] float32, 1.0 = off
    frequency: torch.Tensor | None  # [B] float32, 0.0 = off
    presence: torch.Tensor | None  # [B] float32, 0.0 = off
    output_tokens: SparseTokens  # one pair per output token (repeats kept: they are counted)
    prompt_tokens: SparseTokens | None  # one pair per prompt token; only for rows with a repetition penalty


@dataclass
class SamplingMetadata:
    """The batch's sampling parameters as tensors on the device, built once per step.

    A ``None`` tensor means no row uses that feature: the sampler skips it.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None  # [B] bool; only for a batch mixing greedy and random rows
    temperature: torch.Tensor | None  # [B] float32 (1.0 on greedy rows); None if all greedy or all 1.0
    log_min_p: torch.Tensor | None  # [B] float32 log(min_p) (-inf = off)
    top_k: torch.Tensor | None  # [B] int64 (vocab_size = off)
    max_top_k: int  # the largest enabled top_k (0 when none)
    top_p: torch.Tensor | None  # [B] float32 (_TOP_P_DISABLED = off)
    penalties: PenaltyMetadata | None
    logit_bias: SparseTokens | None
    banned: SparseTokens | None  # min_tokens bans
    seeds: torch.Tensor | None  # [B] int64 generator seed of each row (unused on greedy rows); None if all greedy
    seeds_cpu: np.ndarray | None  # the same on the host, for the CPU path's per-row generators
    is_greedy_cpu: np.ndarray  # [B] bool
    max_num_logprobs: int | None  # N of LogprobsTensors (-1 resolved to vocab_size); None = no row asked
    grammar_mask: GrammarMask | None = None  # allowed tokens of the rows masked before the draw; None = no such row
    # [L] int64: rows under a grammar drawn without a mask, whose draw candidates the sampler returns
    checked_rows: torch.Tensor | None = None

    @property
    def no_penalties(self) -> bool:
        return self.penalties is None

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.log_min_p is None

    @property
    def random_seeds(self) -> list[tuple[int, int]]:
        """(row, generator seed) of every random row."""
        if self.seeds_cpu is None:
            return []
        random_rows = np.flatnonzero(~self.is_greedy_cpu)
        return list(zip(random_rows.tolist(), self.seeds_cpu[random_rows].tolist()))

    @property
    def modifies_logits(self) -> bool:
        """Whether sampling writes into the logits (so a float32 input must be copied first)."""
        return not (self.all_greedy and self.has_no_logits_processing)

    @property
    def has_no_logits_processing(self) -> bool:
        """No bias, ban, penalty or grammar: the logits reach the sampling step as the model gave them."""
        return self.has_no_processing_but_grammar and self.grammar_mask is None

    @property
    def has_no_processing_but_grammar(self) -> bool:
        """No bias, ban or penalty; a grammar mask may be set."""
        return self.penalties is None and self.logit_bias is None and self.banned is None

    @property
    def needs_only_temperature(self) -> bool:
        """Random rows whose only knob is the temperature (a grammar mask aside): a fused kernel can sample straight
        from the raw logits, drawing the rows under a grammar again from a masked copy of just them."""
        return (
            not self.all_greedy
            and self.has_no_processing_but_grammar
            and self.log_min_p is None
            and self.top_k is None
            and self.top_p is None
        )

    @classmethod
    def build(
        cls,
        rows: list[SamplingRow],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: tuple[int, ...],
    ) -> SamplingMetadata:
        device = torch.device(device)
        params = [row.params for row in rows]
        temperatures = np.array([p.temperature for p in params], dtype=np.float64)
        is_greedy = temperatures < SAMPLING_EPS
        # An empty batch counts as all greedy: argmax of [0, V] is an empty result, no draw.
        all_greedy, all_random = bool(is_greedy.all()), bool(rows) and not is_greedy.any()
        host = {} if all_greedy else _random_row_values(rows, params, temperatures, is_greedy, vocab_size)
        penalty_values = _penalty_values(params)
        float32_penalties = {name: array.astype(np.float32) for name, array in penalty_values.items()}
        values = _to_device_packed({**host, **float32_penalties}, device)
        top_k = host.get("top_k")
        return cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=values.get("greedy_mask"),
            temperature=values.get("temperature"),
            log_min_p=values.get("log_min_p"),
            top_k=values.get("top_k"),
            max_top_k=int(top_k[top_k < vocab_size].max()) if top_k is not None else 0,
            top_p=values.get("top_p"),
            penalties=_penalties(rows, penalty_values, values, device),
            logit_bias=_logit_bias(params, device),
            banned=_min_tokens_bans(rows, params, eos_token_ids, device),
            seeds=values.get("seeds"),
            seeds_cpu=host.get("seeds"),
            is_greedy_cpu=is_greedy,
            max_num_logprobs=_max_num_logprobs(params, vocab_size),
        )


def _random_row_values(
    rows: list[SamplingRow],
    params: list[SamplingParams],
    temperatures: np.ndarray,
    is_greedy: np.ndarray,
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """The [B] host arrays the random rows need; a feature no row uses is left out (its op is skipped)."""
    values = {
        "greedy_mask": is_greedy if is_greedy.any() else None,  # only a batch that mixes both kinds needs it
        "temperature": _temperature(temperatures, is_greedy),
        "log_min_p": _log_min_p(params),
        "top_k": _top_k(params, vocab_size),
        "top_p": _top_p(params),
        "seeds": generator_seeds([row.sampling_seed for row in rows], [row.num_output_tokens for row in rows]),
    }
    return {name: array for name, array in values.items() if array is not None}


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool}
# Bytes: every array of the packed buffer starts at a multiple of 16. Triton specializes a kernel on whether each
# pointer argument is 16-byte aligned; at 8, the second array's alignment followed the parity of the batch size, and
# the sampling kernels compiled anew, inside a step, for the other parity (benchmarks/h200/session30).
_PACKING_ALIGNMENT = 16


def _to_device_packed(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Host arrays -> device tensors with ONE host->device copy instead of one per array.

    The arrays are packed into one (pinned) byte buffer, copied once, and viewed back with their dtypes: slicing
    and ``view(dtype)`` launch no kernel. Each costs ~10 us of host time when copied alone.
    """
    offsets, total = {}, 0
    for name, array in arrays.items():
        offsets[name] = total
        total += -(-array.nbytes // _PACKING_ALIGNMENT) * _PACKING_ALIGNMENT
    if total == 0:
        return {}
    packed = torch.empty(total, dtype=torch.uint8, pin_memory=device.type != "cpu")
    packed_host = packed.numpy()
    for name, array in arrays.items():
        packed_host[offsets[name] : offsets[name] + array.nbytes] = np.ascontiguousarray(array).view(np.uint8)
    if device.type != "cpu":
        packed = packed.to(device, non_blocking=True)
    return {
        name: packed[offsets[name] : offsets[name] + array.nbytes].view(_TORCH_DTYPES[array.dtype])
        for name, array in arrays.items()
    }


def _to_device(data: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data -> device tensor without stalling the host: a pinned staging copy, then a non-blocking copy.

    (``torch.tensor(data, device="cuda")`` from pageable memory would wait for all queued GPU work.)
    """
    cpu = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
    if device.type == "cpu":
        return cpu
    return cpu.pin_memory().to(device, non_blocking=True)


def _temperature(temperatures: np.ndarray, is_greedy: np.ndarray) -> np.ndarray | None:
    # Greedy rows get 1.0: they never use the scaled logits, and dividing by 0 would only make nan.
    values = np.where(is_greedy, 1.0, temperatures)
    return None if (values == 1.0).all() else values.astype(np.float32)


def _log_min_p(params: list[SamplingParams]) -> np.ndarray | None:
    min_p = [p.min_p for p in params]
    if min_p.count(0.0) == len(min_p):
        return None
    # Filtering p_i < min_p * p_max is filtering logit_i < logit_max + log(min_p): no softmax needed.
    return np.array([math.log(m) if m > 0.0 else -math.inf for m in min_p], dtype=np.float32)


def _top_k(params: list[SamplingParams], vocab_size: int) -> np.ndarray | None:
    top_k = [p.top_k for p in params]
    if top_k.count(0) == len(top_k):  # the common case, decided without numpy (list.count runs in C)
        return None
    values = np.array(top_k, dtype=np.int64)
    enabled = (values > 0) & (values < vocab_size)
    if not enabled.any():
        return None
    return np.where(enabled, values, vocab_size)


def _top_p(params: list[SamplingParams]) -> np.ndarray | None:
    top_p = [p.top_p for p in params]
    if top_p.count(1.0) == len(top_p) or min(top_p) >= 1.0:
        return None
    values = np.array(top_p, dtype=np.float64)
    return np.where(values < 1.0, values, _TOP_P_DISABLED).astype(np.float32)


def _penalty_values(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """The [B] factors of the penalties some row uses (one that every row leaves neutral is left out)."""
    columns = {
        "repetition": ([p.repetition_penalty for p in params], 1.0),
        "frequency": ([p.frequency_penalty for p in params], 0.0),
        "presence": ([p.presence_penalty for p in params], 0.0),
    }
    # Compared in float64 (the parameters' own precision): a factor that only rounds to neutral still counts.
    return {
        name: np.array(values, dtype=np.float64)
        for name, (values, neutral) in columns.items()
        if values.count(neutral) != len(values)
    }


def _penalties(
    rows: list[SamplingRow],
    host_values: dict[str, np.ndarray],
    device_values: dict[str, torch.Tensor],
    device: torch.device,
) -> PenaltyMetadata | None:
    if not host_values:
        return None
    num_rows = len(rows)
    has_repetition = host_values.get("repetition", np.ones(num_rows)) != 1.0
    penalized = has_repetition.copy()
    for name in ("frequency", "presence"):
        if name in host_values:
            penalized |= host_values[name] != 0.0
    # Only rows with some penalty contribute occurrences; the others would be neutralized anyway.
    output_lists = [row.output_token_ids if is_penalized else [] for row, is_penalized in zip(rows, penalized)]
    prompt_tokens = None
    if has_repetition.any():
        prompt_lists = [row.prompt_token_ids if repeats else [] for row, repeats in zip(rows, has_repetition)]
        prompt_tokens = _sparse_tokens(prompt_lists, device)
    return PenaltyMetadata(
        repetition=device_values.get("repetition"),
        frequency=device_values.get("frequency"),
        presence=device_values.get("presence"),
        output_tokens=_sparse_tokens(output_lists, device),
        prompt_tokens=prompt_tokens,
    )


def _sparse_tokens(
    token_lists: list[list[int]], device: torch.device, value_lists: list[list[float]] | None = None
) -> SparseTokens:
    """Flatten per-row token lists into (row, token[, value]) tensors.

    Goes through numpy: prompts can hold thousands of tokens per row, and numpy reads a list of ints several
    times faster than ``torch.tensor`` does.
    """
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)
    values = None
    if value_lists is not None:
        flat_values = np.fromiter(itertools.chain.from_iterable(value_lists), dtype=np.float32, count=total)
        values = _to_device(flat_values, torch.float32, device)
    return SparseTokens(_to_device(rows, torch.int64, device), _to_device(tokens, torch.int64, device), values)


def _logit_bias(params: list[SamplingParams], device: torch.device) -> SparseTokens | None:
    if not any([p.logit_bias for p in params]):
        return None
    biases = [p.logit_bias or {} for p in params]
    return _sparse_tokens([list(b.keys()) for b in biases], device, [list(b.values()) for b in biases])


def _min_tokens_bans(
    rows: list[SamplingRow], params: list[SamplingParams], eos_token_ids: tuple[int, ...], device: torch.device
) -> SparseTokens | None:
    min_tokens = [p.min_tokens for p in params]
    if min_tokens.count(0) == len(min_tokens):
        return None
    banned = [
        list(dict.fromkeys([*eos_token_ids, *row.params.stop_token_ids]))
        if row.num_output_tokens < row.params.min_tokens
        else []
        for row in rows
    ]
    if not any(banned):
        return None
    return _sparse_tokens(banned, device)


def _max_num_logprobs(params: list[SamplingParams], vocab_size: int) -> int | None:
    requested = [p.logprobs for p in params if p.logprobs is not None]
    if not requested:
        return None
    return vocab_size if -1 in requested else min(max(requested), vocab_size)


class LogprobsTensors(NamedTuple):
    """Logprobs of a batch of positions: column 0 is the chosen token, columns 1..N the top-N (descending).

    ``ranks[:, 0]`` is the chosen token's rank (1 + number of tokens with a strictly larger logprob); ranks of
    the top-N columns are 1..N. Rows that asked for fewer than N are sliced by the caller.
    """

    token_ids: torch.Tensor  # [B, N+1] int64
    logprobs: torch.Tensor  # [B, N+1] float32
    ranks: torch.Tensor  # [B, N+1] int64

    def cpu(self) -> LogprobsTensors:
        """Move to host once, so that ``to_top_logprobs`` on each row does not sync the device again."""
        return LogprobsTensors(self.token_ids.cpu(), self.logprobs.cpu(), self.ranks.cpu())

    def to_top_logprobs(self, row: int, num: int) -> TopLogprobs:
        """The chosen token and the top ``num`` of one row (``num=-1``: all N columns)."""
        end = self.token_ids.shape[1] if num == -1 else num + 1
        return TopLogprobs(
            token_ids=self.token_ids[row, :end].tolist(),
            logprobs=self.logprobs[row, :end].tolist(),
            ranks=self.ranks[row, :end].tolist(),
        )


@dataclass
class SamplerOutput:
    """The sampled token of each row and, when some row asked for them, the logprobs."""

    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: LogprobsTensors | None
    # [L, NUM_DRAW_CANDIDATES] int64: for each of ``metadata.checked_rows``, the tokens in order of decreasing race
    # score (the first is the row's draw); -1 from where the scores are -inf. None when no row is checked.
    candidates: torch.Tensor | None = None
    # [K] int64: for each row of ``metadata.grammar_mask``, what its draw would have been without the mask. Only
    # the fused path has it (it draws every row unmasked first); None elsewhere.
    unmasked_draws: torch.Tensor | None = None


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Logprobs (log_softmax in float32) of ``token_ids`` under ``logits [B, V]``, with their ranks and the top-N."""
    return gather_logprobs(torch.log_softmax(logits, dim=-1, dtype=torch.float32), token_ids, num_top)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Like ``compute_logprobs`` from logprobs already normalized."""
    token_ids = token_ids.to(device=logprobs.device, dtype=torch.int64).unsqueeze(1)
    chosen = logprobs.gather(1, token_ids)
    chosen_rank = (logprobs > chosen).sum(dim=1, keepdim=True) + 1
    num_top = min(num_top, logprobs.shape[1])
    if num_top <= 0:
        return LogprobsTensors(token_ids, chosen, chosen_rank)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=1)
    top_ranks = torch.arange(1, num_top + 1, device=logprobs.device).expand(logprobs.shape[0], -1)
    return LogprobsTensors(
        torch.cat([token_ids, top_ids], dim=1),
        torch.cat([chosen, top_logprobs], dim=1),
        torch.cat([chosen_rank, top_ranks], dim=1),
    )


class Sampler:
    """Samples one token per row of ``logits [B, V]`` under each row's ``SamplingParams`` (see module docstring)."""

    def __init__(self, use_triton: bool | None = None) -> None:
        # None: the Triton kernel draws exactly when the logits are on CUDA (tests force it on CPU, interpreted).
        self._use_triton = use_triton
        # One generator per device, re-seeded for every row: each draw depends only on the seed it is given.
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        if tuple(logits.shape) != (metadata.num_rows, metadata.vocab_size):
            raise ValueError(f"logits must be [{metadata.num_rows}, {metadata.vocab_size}], got {tuple(logits.shape)}")
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        use_triton = logits.is_cuda if self._use_triton is None else self._use_triton
        if use_triton and metadata.needs_only_temperature:
            # The common case in one kernel: it reads the raw logits once, in their dtype, and scales them itself.
            sampled, unmasked_draws = _sample_rows_fused(logits, metadata)
            candidates = (
                None if metadata.checked_rows is None
                else _kernel_candidates(logits, metadata, temperature=metadata.temperature)
            )
        else:
            logits = _float32_for_writing(logits, metadata.modifies_logits)
            logits = apply_logits_processing(logits, metadata)
            sampled, candidates = self._sample(logits, metadata, use_triton)
            unmasked_draws = None
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, logprobs, candidates, unmasked_draws)

    def warm_up(self, logits: torch.Tensor, metadata: SamplingMetadata) -> None:
        """Run ``logits`` through every path a step of these rows can take, so that no kernel compiles inside a step:
        the plain draw, then every row under an allow-all grammar, masked before the draw (xgrammar's bitmask
        kernel, the masked redraw) and drawn unmasked with its candidates ranked (the race scores). The step's own
        paths, so that an all-greedy batch takes no kernel its steps never take (it has no seeds to draw with)."""
        self(logits, metadata)
        rows = torch.arange(metadata.num_rows, device=logits.device)
        allow_all = torch.full((metadata.num_rows, -(-metadata.vocab_size // 32)), -1, dtype=torch.int32,
                               device=logits.device)
        self(logits, replace(metadata, grammar_mask=GrammarMask(rows, allow_all)))
        self(logits, replace(metadata, checked_rows=rows))

    def _sample(
        self, logits: torch.Tensor, metadata: SamplingMetadata, use_triton: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens, and the candidates of the checked rows (None if there is none)."""
        checked = metadata.checked_rows
        if metadata.all_greedy:
            candidates = None if checked is None else top_candidates(logits.index_select(0, checked))
            return logits.argmax(dim=-1), candidates
        if use_triton:
            # Greedy rows take their argmax in the kernel, after the filters: those leave them unchanged
            # (temperature 1.0, min_p/top_k/top_p off), so it is the argmax of the processed logits, as below.
            logits = apply_random_row_filters(logits, metadata)
            sampled = _triton_sampling().sample_rows(logits, metadata.seeds, metadata.greedy_mask)
            return sampled, None if checked is None else _kernel_candidates(logits, metadata, temperature=None)
        greedy = None if metadata.all_random else logits.argmax(dim=-1)
        logits = apply_random_row_filters(logits, metadata)
        scores = self._race_scores(logits, metadata)
        sampled = scores.argmax(dim=-1)
        if greedy is not None:
            sampled = torch.where(metadata.greedy_mask, greedy, sampled)
        # A greedy row's noise is 1 (log 1 = 0): its scores are its logits, ranked as its argmax ranks them.
        return sampled, None if checked is None else top_candidates(scores.index_select(0, checked))

    def _race_scores(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """The exponential race's scores: argmax(p / E) == argmax(log p - log E), and log p differs from the logits
        by a per-row constant."""
        noise = self._draw_exponential(logits, metadata)
        return logits - noise.clamp_min_(_TINY).log_()

    def _draw_exponential(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        noise = torch.empty_like(logits)
        if not metadata.all_random:
            noise.fill_(1.0)  # greedy rows: any finite noise; their sample is discarded
        generator = self._generator(logits.device)
        row_views = noise.unbind(0)  # all row views in one call: cheaper than indexing inside the loop
        for row, seed in metadata.random_seeds:
            generator.manual_seed(seed)
            row_views[row].exponential_(generator=generator)
        return noise

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def _triton_sampling() -> ModuleType:
    """The Triton kernel's module, imported on first use: a CPU-only install never needs Triton."""
    return importlib.import_module("pagedllm.worker.triton_sampling")


def _sample_rows_fused(
    logits: torch.Tensor, metadata: SamplingMetadata
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature-only rows drawn by the fused kernel from the raw logits. Rows under a grammar are drawn again from
    a masked float32 copy of just them, processed as the general path does (same tokens as there): the mask costs in
    proportion to the constrained rows, and the other rows keep the one-pass path. Also returns the masked rows'
    unmasked draws (None without a mask)."""
    kernel = _triton_sampling()
    sampled = kernel.sample_rows(logits, metadata.seeds, metadata.greedy_mask, metadata.temperature)
    mask = metadata.grammar_mask
    if mask is None:
        return sampled, None
    unmasked_draws = sampled.index_select(0, mask.rows)
    constrained = logits.index_select(0, mask.rows).float()
    apply_grammar_mask(constrained, GrammarMask(torch.arange(len(mask.rows), device=logits.device), mask.bitmask))
    temperature, greedy_mask = (_select_rows(t, mask.rows) for t in (metadata.temperature, metadata.greedy_mask))
    constrained = apply_temperature(constrained, temperature)
    redrawn = kernel.sample_rows(constrained, metadata.seeds.index_select(0, mask.rows), greedy_mask)
    return sampled.index_copy_(0, mask.rows, redrawn), unmasked_draws


def _kernel_candidates(
    logits: torch.Tensor, metadata: SamplingMetadata, temperature: torch.Tensor | None
) -> torch.Tensor:
    """The candidates of the checked rows, ranked by the scores the Triton draw maximizes (``temperature``: [B] to
    divide the logits by, as the fused path does; None where the logits are already scaled)."""
    rows = metadata.checked_rows
    seeds, greedy_mask, temperature = (_select_rows(t, rows) for t in (metadata.seeds, metadata.greedy_mask, temperature))
    return top_candidates(_triton_sampling().race_scores(logits.index_select(0, rows), seeds, greedy_mask, temperature))


def top_candidates(scores: torch.Tensor) -> torch.Tensor:
    """Each row's ``NUM_DRAW_CANDIDATES`` best-scoring tokens, best first; -1 where the score is -inf (a token that
    cannot be drawn: banned, or past the tokens left). Equal scores come in no set order."""
    values, token_ids = scores.topk(min(NUM_DRAW_CANDIDATES, scores.shape[1]), dim=1)
    return token_ids.masked_fill_(values == -math.inf, -1)


def _select_rows(values: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values.index_select(0, rows)


def _float32_for_writing(logits: torch.Tensor, will_write: bool) -> torch.Tensor:
    """Float32 logits the sampler may modify in place, never the caller's tensor."""
    if logits.dtype != torch.float32:
        return logits.float()
    return logits.clone() if will_write else logits


def apply_logits_processing(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """logit_bias, then min_tokens bans, then penalties, then the grammar mask (in place on ``logits``)."""
    if metadata.logit_bias is not None:
        bias = metadata.logit_bias
        logits.index_put_((bias.rows, bias.tokens), bias.values, accumulate=True)
    if metadata.banned is not None:
        logits[metadata.banned.rows, metadata.banned.tokens] = -math.inf
    if metadata.penalties is not None:
        logits = apply_penalties(logits, metadata.penalties)
    if metadata.grammar_mask is not None:
        logits = apply_grammar_mask(logits, metadata.grammar_mask)
    return logits


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """Set the logits of tokens a row's grammar forbids to -inf, in place; only the constrained rows are read or
    written. On CPU and CUDA with xgrammar's kernels (C++ / Triton): they test the bits where they read the logits,
    so no unpacked [rows, V] mask is ever made."""
    if not _has_bitmask_kernel(logits):
        return apply_grammar_mask_torch(logits, mask)
    import xgrammar  # a grammar mask exists only when the xgrammar backend made it

    # The kernels take the bitmask row of the logits row they mask: spread the compact rows out over the batch
    # (a bitmask row is 1/32 of a logits row; the rows of unconstrained rows are never read, so left uninitialized).
    num_rows, vocab_size = logits.shape
    bitmask = mask.bitmask.new_empty((num_rows, mask.bitmask.shape[1])).index_copy_(0, mask.rows, mask.bitmask)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=mask.rows)
    return logits


def _has_bitmask_kernel(logits: torch.Tensor) -> bool:
    if logits.is_cuda:
        return True
    return logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)


def apply_grammar_mask_torch(logits: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """``apply_grammar_mask`` in plain torch (any device; the reference in tests): it unpacks the constrained rows'
    bits into a bool [rows, V] tensor: several times the kernels' time at V = 152k (measured on CPU)."""
    vocab_size = logits.shape[1]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((mask.bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]
    rows = logits.index_select(0, mask.rows)
    rows.masked_fill_(~allowed, -math.inf)
    return logits.index_copy_(0, mask.rows, rows)


def apply_penalties(logits: torch.Tensor, penalties: PenaltyMetadata) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output only), as in vLLM."""
    out = penalties.output_tokens
    counts = torch.zeros_like(logits)
    counts.index_put_((out.rows, out.tokens), torch.ones_like(out.rows, dtype=logits.dtype), accumulate=True)
    in_output = counts > 0
    if penalties.repetition is not None:
        seen = in_output.clone()
        if penalties.prompt_tokens is not None:
            seen[penalties.prompt_tokens.rows, penalties.prompt_tokens.tokens] = True
        factor = torch.where(seen, penalties.repetition.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / factor, logits * factor)
    if penalties.frequency is not None:
        logits -= penalties.frequency.unsqueeze(1) * counts
    if penalties.presence is not None:
        logits -= penalties.presence.unsqueeze(1) * in_output
    return logits


def apply_random_row_filters(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """What shapes the random rows' distributions: temperature, then min_p, then top_k and top_p."""
    logits = apply_temperature(logits, metadata.temperature)
    logits = apply_min_p(logits, metadata.log_min_p)
    return apply_top_k_top_p(logits, metadata.top_k, metadata.max_top_k, metadata.top_p)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor | None) -> torch.Tensor:
    if temperature is None:
        return logits
    return logits.div_(temperature.unsqueeze(1))


def apply_min_p(logits: torch.Tensor, log_min_p: torch.Tensor | None) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max, i.e. logit < max_logit + log(min_p)."""
    if log_min_p is None:
        return logits
    threshold = logits.amax(dim=1, keepdim=True) + log_min_p.unsqueeze(1)
    return logits.masked_fill_(logits < threshold, -math.inf)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's top_k logits, then its smallest nucleus of mass >= top_p; the rest -> -inf."""
    if top_p is None:
        return _apply_top_k_only(logits, top_k, max_top_k) if top_k is not None else logits
    # top_p needs the whole distribution in order: one descending sort serves both filters.
    sorted_logits, sorted_ids = logits.sort(dim=1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, -math.inf)
    probs = sorted_logits.softmax(dim=1)
    mass_before = probs.cumsum(dim=1) - probs  # probability of the strictly more likely tokens
    # The first token always stays (mass_before = 0 < top_p), so no row is left empty.
    sorted_logits.masked_fill_(mass_before >= top_p.unsqueeze(1), -math.inf)
    return logits.scatter_(1, sorted_ids, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """top_k without sorting the vocabulary: a top-``max_top_k`` gives each row its k-th largest logit."""
    vocab_size = logits.shape[1]
    top_values = logits.topk(max_top_k, dim=1).values
    kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    kth.masked_fill_((top_k >= vocab_size).unsqueeze(1), -math.inf)  # rows without top_k keep everything
    return logits.masked_fill_(logits < kth, -math.inf)
