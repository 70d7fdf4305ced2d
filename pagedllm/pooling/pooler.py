"""The runner side of pooling: turn each pooling request's rows of a step's hidden states into its vector.

A prompt may be computed over several steps (chunked prefill), so the pooler keeps a per-request partial state
between them: the running sum and count for mean pooling, the first row for CLS; last-token pooling needs only the
final chunk's last row. All in float32 on the device; the finished vectors of a step are stacked and copied to the
host once, as plain lists (what ``ModelRunnerOutput`` may carry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.pooling.params import PoolingParams


@dataclass(slots=True)
class PoolingChunk:
    """One request's rows in a step: ``hidden[flat_start : flat_start + num_rows]`` are prompt positions
    ``first_position ...``; ``is_last`` when the step computes the prompt's last token."""

    req_id: str
    params: PoolingParams
    flat_start: int
    num_rows: int
    first_position: int
    is_last: bool


class _Partial:
    """What a request's earlier chunks left: the sum of rows (mean) or the first row (CLS)."""

    __slots__ = ("total", "count")

    def __init__(self, total: torch.Tensor, count: int) -> None:
        self.total = total
        self.count = count


class Pooler:
    """Pools the chunks of each step; holds the partial state of requests whose prompt spans several steps."""

    def __init__(self) -> None:
        self._partials: dict[str, _Partial] = {}

    def forget(self, req_id: str) -> None:
        """The request left the runner (finished, aborted or preempted: it restarts from its first token)."""
        self._partials.pop(req_id, None)

    def pool(self, hidden: torch.Tensor, chunks: list[PoolingChunk]) -> dict[str, list[float]]:
        """The finished vectors of this step's chunks (req_id -> embedding); partial chunks are accumulated."""
        finished_ids, vectors = [], []
        for chunk in chunks:
            vector = self._add_chunk(hidden, chunk)
            if vector is not None:
                finished_ids.append(chunk.req_id)
                vectors.append(_finalize(vector, chunk.params))
        if not vectors:
            return {}
        return dict(zip(finished_ids, _to_lists(vectors)))

    def _add_chunk(self, hidden: torch.Tensor, chunk: PoolingChunk) -> torch.Tensor | None:
        rows = hidden[chunk.flat_start : chunk.flat_start + chunk.num_rows].float()
        pooling_type = chunk.params.pooling_type
        if pooling_type == "LAST":
            return rows[-1] if chunk.is_last else None
        if chunk.first_position == 0:
            self._partials.pop(chunk.req_id, None)  # a fresh start (e.g. recomputed after a preemption)
        if pooling_type == "MEAN":
            self._accumulate(chunk.req_id, rows.sum(dim=0), chunk.num_rows)
        elif chunk.first_position == 0:
            self._accumulate(chunk.req_id, rows[0], 1)  # CLS: the first position's row
        if not chunk.is_last:
            return None
        partial = self._partials.pop(chunk.req_id)
        return partial.total / partial.count

    def _accumulate(self, req_id: str, total: torch.Tensor, count: int) -> None:
        partial = self._partials.get(req_id)
        if partial is None:
            self._partials[req_id] = _Partial(total.clone(), count)
        else:
            partial.total += total
            partial.count += count


def _finalize(vector: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """Matryoshka truncation first, then L2 normalization (so a truncated vector has unit norm too)."""
    if params.dimensions is not None:
        vector = vector[: params.dimensions]
    return F.normalize(vector, p=2, dim=-1) if params.normalize else vector


def _to_lists(vectors: list[torch.Tensor]) -> list[list[float]]:
    """One device->host copy for the step's vectors (they may differ in length: Matryoshka)."""
    if all(v.shape == vectors[0].shape for v in vectors):
        return torch.stack(vectors).cpu().tolist()
    flat = torch.cat(vectors).cpu().tolist()
    lists, start = [], 0
    for vector in vectors:
        lists.append(flat[start : start + vector.shape[0]])
        start += vector.shape[0]
    return lists
