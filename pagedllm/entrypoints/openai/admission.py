"""Admission control: a server that says no early (429 with ``Retry-After``) instead of queueing without bound.

The gate stands in the ASGI middleware (``http_guards.RequestGuard``), in front of the generation routes, so a
refusal costs no body read, no tokenization, and is a real HTTP status even for a stream. It counts the generation
requests in flight; those beyond the engine's ``max_num_seqs`` are the ones waiting. A new request is refused when

- ``--max-num-waiting N``: N requests already wait, or
- ``--max-queue-delay-ms MS``: requests wait and, at the current drain rate, the new one would wait longer than MS.

``Retry-After`` is the time the requests waiting now take to drain at the rate requests finished recently. An
admitted request that still waits past the delay is dropped by the engine (``engine/deadlines.py``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from http import HTTPStatus

from pagedllm.engine.deadlines import REJECTED_METRIC, QueueTimeoutError, RequestTimeoutError
from pagedllm.engine.metrics import Metric
from pagedllm.entrypoints.openai.errors import OpenAIError

# The routes that start engine work; others (probes, /tokenize, /v1/models) always pass.
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings")
_DRAIN_WINDOW_S = 10.0  # the drain rate is that of the last few seconds: it follows load changes quickly
_MAX_RETRY_AFTER_S = 60
REJECTION_REASONS = ("max_num_waiting", "max_queue_delay", "draining")  # draining: 503 while shutting down


@dataclass(frozen=True)
class AdmissionConfig:
    """The gate's limits (None: no limit); ``max_num_seqs``: how many requests run at once (the rest wait)."""

    max_num_seqs: int
    max_num_waiting: int | None = None
    max_queue_delay_s: float | None = None

    @property
    def is_enabled(self) -> bool:
        return self.max_num_waiting is not None or self.max_queue_delay_s is not None


class DrainRate:
    """Requests finished per second over the last ``window_s``."""

    def __init__(self, window_s: float = _DRAIN_WINDOW_S) -> None:
        self.window_s = window_s
        self._finished: deque[float] = deque()
        self._since = time.monotonic()  # a younger window is shorter: the rate is not diluted at start-up

    def record(self, now: float) -> None:
        self._finished.append(now)

    def per_second(self, now: float) -> float:
        while self._finished and self._finished[0] < now - self.window_s:
            self._finished.popleft()
        span = min(self.window_s, now - self._since)
        return len(self._finished) / span if span > 0 else 0.0


class AdmissionControl:
    """Counts generation requests in flight, admits or refuses new ones, and keeps the rejection counts."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.num_in_flight = 0
        self.drain = DrainRate()
        self.num_rejected: Counter[str] = Counter()

    @property
    def num_waiting(self) -> int:
        """Requests admitted beyond what runs at once: an estimate of the engine's queue, exact on the HTTP side."""
        return max(0, self.num_in_flight - self.config.max_num_seqs)

    def try_admit(self) -> OpenAIError | None:
        """Admit a request (None: the caller must ``release`` it later) or the 429 that refuses it."""
        now = time.monotonic()
        reason = self._refusal_reason(now)
        if reason is not None:
            self.num_rejected[reason] += 1
            return self._rejection(reason, now)
        self.num_in_flight += 1
        return None

    def record_rejection(self, reason: str) -> None:
        """Count a request refused by another gate (``draining``: the server is shutting down)."""
        self.num_rejected[reason] += 1

    def release(self) -> None:
        """An admitted request is over (finished, failed or abandoned): it no longer holds a place."""
        self.num_in_flight -= 1
        self.drain.record(time.monotonic())

    def is_overloaded(self) -> bool:
        """A new request would be refused for the queue's length (readiness says 503 meanwhile)."""
        limit = self.config.max_num_waiting
        return limit is not None and self.num_in_flight >= self.config.max_num_seqs + limit

    def _refusal_reason(self, now: float) -> str | None:
        if self.is_overloaded():
            return "max_num_waiting"
        delay = self.config.max_queue_delay_s
        would_wait = self.num_in_flight + 1 > self.config.max_num_seqs
        if delay is not None and would_wait and self.expected_wait_s(now, self.num_waiting + 1) > delay:
            return "max_queue_delay"
        return None

    def expected_wait_s(self, now: float, num_ahead: int) -> float:
        """How long ``num_ahead`` waiting requests take to drain at the recent rate (0 when it is not known yet:
        no request finished lately, so no estimate; the engine's queue deadline still bounds the wait)."""
        rate = self.drain.per_second(now)
        return num_ahead / rate if rate > 0 else 0.0

    def retry_after_s(self, now: float) -> int:
        """Whole seconds until the queue has drained at the recent rate, at least 1 and at most a minute."""
        expected = self.expected_wait_s(now, self.num_waiting + 1)
        if expected == 0 and self.config.max_queue_delay_s is not None:
            expected = self.config.max_queue_delay_s  # no rate known yet: one queue delay
        return min(_MAX_RETRY_AFTER_S, max(1, math.ceil(expected)))

    def _rejection(self, reason: str, now: float) -> OpenAIError:
        if reason == "max_num_waiting":
            message = (f"The server is overloaded: {self.num_waiting} requests are waiting, the most it queues "
                       "(--max-num-waiting); retry later")
        else:
            delay_ms = self.config.max_queue_delay_s * 1000
            message = (f"The server is overloaded: a new request would wait longer than {delay_ms:g} ms "
                       "(--max-queue-delay-ms); retry later")
        return overloaded(message, self.retry_after_s(now), code="server_overloaded")

    def metrics(self) -> list[Metric]:
        return [Metric(REJECTED_METRIC, "counter", self.num_rejected[reason], {"reason": reason})
                for reason in REJECTION_REASONS]


def overloaded(message: str, retry_after_s: float, code: str) -> OpenAIError:
    """A 429 in OpenAI's shape, with ``Retry-After`` in whole seconds (OpenAI's SDKs honour it)."""
    retry_after = str(max(1, math.ceil(retry_after_s)))
    return OpenAIError(message, HTTPStatus.TOO_MANY_REQUESTS, code=code, headers={"Retry-After": retry_after})


def deadline_error(exc: Exception, retry_after_s: float = 1.0) -> OpenAIError | None:
    """The HTTP error of a request the engine dropped at a deadline (None: ``exc`` is something else). Dropped for
    the queue delay is a 429 (the server is overloaded: retry); past its own ``timeout``, a 408."""
    if isinstance(exc, QueueTimeoutError):
        return overloaded(str(exc), retry_after_s, code="queue_timeout")
    if isinstance(exc, RequestTimeoutError):
        return OpenAIError(str(exc), HTTPStatus.REQUEST_TIMEOUT, param="timeout", code="request_timeout")
    return None


def is_generation_request(scope: dict) -> bool:
    return scope.get("method") == "POST" and scope["path"].endswith(GENERATION_PATHS)


# ---- flags -------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _delay_ms(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of milliseconds, got {text}")
    return value


def add_admission_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admission control (over a limit: a 429 with Retry-After)")
    group.add_argument("--max-num-waiting", type=_positive_int, default=None, metavar="N",
                       help="most requests that wait for a place in the running batch (beyond --max-num-seqs); "
                            "more are refused at once, and /ready answers 503 while the queue is full "
                            "(default: no limit)")
    group.add_argument("--max-queue-delay-ms", type=_delay_ms, default=None, metavar="MS",
                       help="longest a request may wait for its first token: a new one that would wait longer at "
                            "the current drain rate is refused, an admitted one still waiting after MS is dropped "
                            "(default: no limit)")


def admission_config(args: argparse.Namespace, max_num_seqs: int) -> AdmissionConfig:
    delay_ms = getattr(args, "max_queue_delay_ms", None)
    return AdmissionConfig(max_num_seqs, getattr(args, "max_num_waiting", None),
                           None if delay_ms is None else delay_ms / 1000)
