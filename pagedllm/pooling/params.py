"""What a user asks of one embedding (``PoolingParams``, vLLM's name), resolved against the model's pooling.

A leaf of plain data (no torch): it crosses to the engine core in ``EngineCoreRequest`` (msgspec) and rides on the
scheduler's ``Request``; the runner reads the resolved fields.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pagedllm.params import RequestOutputKind
from pagedllm.pooling.config import POOLING_TYPES, PoolerConfig


@dataclass
class PoolingParams:
    """``dimensions``: keep the first N values (Matryoshka), renormalized when normalizing; ``normalize``: L2
    (None: the model's default, on for most embedding models); ``pooling_type``: "LAST", "MEAN" or "CLS" (None:
    the model's; a pagedllm extension, vLLM fixes it per model); ``truncate_prompt_tokens``: embed only the last N
    tokens of the input (-1: as many as max_model_len allows); None: a longer input is an error."""

    dimensions: int | None = None
    normalize: bool | None = None
    pooling_type: str | None = None
    truncate_prompt_tokens: int | None = None  # keep the last N tokens of a longer input (-1: max_model_len)

    def __post_init__(self) -> None:
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        truncate = self.truncate_prompt_tokens
        if truncate is not None and (isinstance(truncate, bool) or not isinstance(truncate, int)
                                     or (truncate < 1 and truncate != -1)):
            raise ValueError(f"truncate_prompt_tokens must be a positive integer or -1, got {truncate!r}")
        if self.pooling_type is not None:
            if not isinstance(self.pooling_type, str) or self.pooling_type.upper() not in POOLING_TYPES:
                raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
            self.pooling_type = self.pooling_type.upper()

    def resolved(self, pooler: PoolerConfig, hidden_size: int) -> PoolingParams:
        """A copy with every field set from the model's pooling; ValueError on dimensions the model cannot give."""
        self._check_dimensions(pooler, hidden_size)
        return replace(self, normalize=pooler.normalize if self.normalize is None else self.normalize,
                       pooling_type=self.pooling_type or pooler.pooling_type)

    def _check_dimensions(self, pooler: PoolerConfig, hidden_size: int) -> None:
        if self.dimensions is None:
            return
        if self.dimensions > hidden_size:
            raise ValueError(f"dimensions={self.dimensions} exceeds the model's embedding size ({hidden_size})")
        allowed = pooler.matryoshka_dimensions
        if allowed is not None and self.dimensions not in allowed:
            raise ValueError(f"dimensions={self.dimensions} is not one of the model's Matryoshka dimensions "
                             f"{list(allowed)}")

    @property
    def output_kind(self) -> RequestOutputKind:
        """One output per request, when finished (what the engine's streams read)."""
        return RequestOutputKind.FINAL_ONLY

    @property
    def needs_every_position(self) -> bool:
        """Whether pooling reads hidden states before the last token (mean, first): then no prompt token may be
        skipped as a prefix-cache hit, and the runner's partial sums must survive every chunk."""
        return self.pooling_type != "LAST"
