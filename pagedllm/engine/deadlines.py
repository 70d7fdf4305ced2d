"""Server-side deadlines of requests in flight: the longest a request may wait for its first token
(``--max-queue-delay-ms``) and a request's own ``timeout``. The engine loop thread owns a ``RequestDeadlines`` and
sweeps it after every step; an expired request is aborted there (its KV blocks freed at once) and its stream ends
with one of the errors below, which the server turns into an HTTP error.

"Queued" means admitted but without a first token yet: the front end learns that a request was scheduled only with
its first token, and a client cares about the wait until it, not about the scheduler's phases.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable

from pagedllm.engine.metrics import PREFIX, Metric

REJECTED_METRIC = PREFIX + "request_rejected_total"  # shared with the server's admission gate (its own reasons)


class QueueTimeoutError(RuntimeError):
    """The request waited longer than the server's queue delay for its first token (the server is overloaded)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(RuntimeError):
    """The request ran past the ``timeout`` it asked for."""


class RequestDeadlines:
    """Deadlines of the requests in flight (monotonic seconds), and how many expired, by reason.

    A heap per kind rather than a scan: a sweep costs nothing until the earliest deadline passes. Entries of
    requests that ended are dropped lazily, when they reach the top."""

    def __init__(self, max_queue_delay_s: float | None = None) -> None:
        if max_queue_delay_s is not None and not max_queue_delay_s > 0:
            raise ValueError(f"max_queue_delay_s must be positive, got {max_queue_delay_s}")
        self.max_queue_delay_s = max_queue_delay_s
        self._first_token: list[tuple[float, str]] = []
        self._end: list[tuple[float, str]] = []
        self._live: set[str] = set()
        self.num_expired: Counter[str] = Counter()  # "queue_timeout" / "request_timeout" -> count

    def add(self, request_id: str, now: float, timeout_s: float | None = None) -> None:
        self._live.add(request_id)
        if self.max_queue_delay_s is not None:
            heapq.heappush(self._first_token, (now + self.max_queue_delay_s, request_id))
        if timeout_s is not None:
            heapq.heappush(self._end, (now + timeout_s, request_id))

    def discard(self, request_id: str) -> None:
        """The request ended (finished or aborted): its deadlines no longer apply."""
        self._live.discard(request_id)

    def expired(self, now: float, has_first_token: Callable[[str], bool]) -> list[tuple[str, Exception]]:
        """The requests whose deadline has passed, each with the error that ends its stream; they are forgotten."""
        expired = [(rid, self._request_timeout(rid)) for rid in self._pop_due(self._end, now)]
        for request_id in self._pop_due(self._first_token, now):
            if request_id in self._live and not has_first_token(request_id):
                expired.append((request_id, self._queue_timeout()))
        for request_id, error in expired:
            self._live.discard(request_id)
            self.num_expired[_reason(error)] += 1
        return expired

    def record_expired(self, reason: str) -> None:
        """Count a request dropped at a deadline that a caller enforced itself (see ``AsyncEngine``)."""
        self.num_expired[reason] += 1

    def _pop_due(self, heap: list[tuple[float, str]], now: float) -> list[str]:
        due = []
        while heap and heap[0][0] <= now:
            request_id = heapq.heappop(heap)[1]
            if request_id in self._live:
                due.append(request_id)
        return due

    def _queue_timeout(self) -> QueueTimeoutError:
        delay_ms = self.max_queue_delay_s * 1000
        return QueueTimeoutError(f"The server is overloaded: the request waited more than {delay_ms:g} ms "
                                 "(--max-queue-delay-ms) to be served and was dropped; retry later",
                                 retry_after_s=self.max_queue_delay_s)

    def _request_timeout(self, request_id: str) -> RequestTimeoutError:
        return RequestTimeoutError("The request did not finish within its timeout and was aborted")

    def metrics(self) -> list[Metric]:
        return [Metric(REJECTED_METRIC, "counter", self.num_expired[reason], {"reason": reason})
                for reason in ("queue_timeout", "request_timeout")]


def _reason(error: Exception) -> str:
    return "queue_timeout" if isinstance(error, QueueTimeoutError) else "request_timeout"
