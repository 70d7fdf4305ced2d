"""``/metrics`` of the whole server when several API server processes share one engine core
(``serve --api-server-count N``): whichever process a scrape reaches answers for all of them.

Each API server process keeps its own metrics (requests it took, tokens it detokenized, latencies it measured) and
writes a snapshot of them to its file in a directory the ``serve`` parent made (every ``WRITE_INTERVAL_S``, and once
at the end; written whole and renamed, so a reader never sees half a file). A scrape adds the other processes' latest
snapshots to its own live values: counters and histograms summed, as are gauges of the front end; the core's own
metrics (scheduler gauges and counters, cache info: ``EngineMetrics.core_metric_names``), which every process
receives alike, taken once from this process. The others' share is at most ``WRITE_INTERVAL_S`` old.

Not prometheus_client's multiprocess mode: the engine keeps its metrics as plain values read at scrape time (see
``metrics.py``), so a snapshot per process is the whole of what must be shared.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from pagedllm.engine.metrics import EngineMetrics, Metric

logger = logging.getLogger(__name__)

WRITE_INTERVAL_S = 0.5
_SUFFIX = ".metrics"


class SharedMetrics:
    """This API server process's metrics, written for the others, and the sum of everyone's for a scrape."""

    def __init__(self, directory: str, index: int, get_metrics: Callable[[], list[Metric]]) -> None:
        self.directory = Path(directory)
        self.index = index
        self.get_metrics = get_metrics
        self._path = self.directory / f"{index}{_SUFFIX}"
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(list[Metric])
        self._core_names = EngineMetrics.core_metric_names()

    def collect(self) -> list[Metric]:
        """Every process's metrics as one set: this one's live, the others' latest snapshots."""
        return merge(self.get_metrics(), self._read_others(), self._core_names)

    async def write_periodically(self) -> None:
        while True:
            self.write()
            await asyncio.sleep(WRITE_INTERVAL_S)

    def write(self) -> None:
        temporary = self._path.with_suffix(".tmp")
        temporary.write_bytes(self._encoder.encode(self.get_metrics()))
        os.replace(temporary, self._path)  # readers see the old snapshot or the new one, never a part

    def _read_others(self) -> list[list[Metric]]:
        snapshots = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            if path != self._path:
                snapshots.append(self._read(path))
        return snapshots

    def _read(self, path: Path) -> list[Metric]:
        try:
            return self._decoder.decode(path.read_bytes())
        except (OSError, msgspec.DecodeError):  # gone at exit, or written by another version: skip it
            logger.debug("Could not read the metrics snapshot %s", path, exc_info=True)
            return []


def merge(own: list[Metric], others: list[list[Metric]], core_names: frozenset[str]) -> list[Metric]:
    """``own`` with the same-named, same-labelled samples of ``others`` added, except the core's metrics (once)."""
    merged = {_key(metric): metric for metric in own}
    for snapshot in others:
        for metric in snapshot:
            if metric.name in core_names:
                continue
            key = _key(metric)
            found = merged.get(key)
            merged[key] = metric if found is None else _added(found, metric)
    return list(merged.values())


def _key(metric: Metric) -> tuple[str, tuple[tuple[str, str], ...]]:
    return metric.name, tuple(sorted(metric.labels.items()))


def _added(first: Metric, second: Metric) -> Metric:
    buckets = tuple((bound, count + other) for (bound, count), (_, other) in zip(first.buckets, second.buckets))
    return Metric(first.name, first.kind, first.value + second.value, first.labels, first.count + second.count,
                  buckets)
