"""Finding the request that makes a step fail: retry the suspects of a failed step in ever smaller groups.

When a step raises, every request it scheduled is a suspect. The suspects form one group; while groups remain, the
scheduler runs only the first group (the probe). A probe fails: a group of one is a culprit (failed alone), a larger
group is split in two halves probed one after the other. A probe succeeds: its members that have caught up (every
token computed, i.e. they sampled) are cleared; the others are probed again at the next step, so a request is not
cleared by a prefill chunk before the step that failed it is replayed.

Two patterns mean the fault is not any request's (an *engine fault*): ``max_consecutive_failures`` failed steps with
no successful step between them (every step fails, whatever it runs), or a second round in a row that ends with
every suspect cleared and no successful normal step since the first (the step fails only with several requests,
never with one). Pure bookkeeping over request ids: the scheduler does the requeueing and the failing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONSECUTIVE_FAILURES = 12


@dataclass(slots=True)
class FailureVerdict:
    """What a failed step means: requests to fail as culprits, and (on an engine fault) the fault and the requests
    the engine gives up on."""

    culprits: list[str] = field(default_factory=list)
    engine_fault: str | None = None
    given_up: list[str] = field(default_factory=list)


class Quarantine:
    """Bisection over the suspects of failed steps, and the engine-fault verdict (see the module docstring)."""

    def __init__(self, max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES) -> None:
        self.max_consecutive_failures = max_consecutive_failures
        self._groups: deque[list[str]] = deque()  # the probe first
        self._consecutive_failures = 0
        self._round_found_culprit = False
        self._round_suspects: list[str] = []  # the suspects the current round started from, for the fault log
        self._rounds_without_culprit = 0  # since the last successful normal step
        self.engine_fault: str | None = None  # declared, and no successful normal step since

    @property
    def is_probing(self) -> bool:
        return bool(self._groups)

    @property
    def is_engaged(self) -> bool:
        """Whether a successful step has anything to tell: false on the fast path of a healthy engine."""
        return bool(self._groups or self._consecutive_failures or self._rounds_without_culprit or self.engine_fault)

    def probe(self, alive: Collection[str]) -> set[str]:
        """The request ids of the group to run now (those still ``alive``); empty when not probing."""
        while self._groups:
            group = [request_id for request_id in self._groups[0] if request_id in alive]
            if group:
                self._groups[0] = group
                return set(group)
            self._groups.popleft()
            self._end_round_if_done()
        return set()

    def release_probe(self) -> None:
        """The probe could not be scheduled at all (nothing of it fits): let its members run normally again."""
        if self._groups:
            self._groups.popleft()
            self._end_round_if_done()

    def record_failure(self, scheduled: list[str], error: str) -> FailureVerdict:
        """A step that ran ``scheduled`` raised ``error``: blame, split, or declare an engine fault."""
        self._consecutive_failures += 1
        if not self._groups:
            self._round_found_culprit, self._round_suspects = False, list(scheduled)
        rest = self._take_from_probe(scheduled)
        verdict = FailureVerdict()
        if len(scheduled) == 1:
            verdict.culprits = list(scheduled)
            self._round_found_culprit = True
        elif scheduled:
            middle = len(scheduled) // 2
            self._groups.extendleft([scheduled[middle:], scheduled[:middle]])
        if rest:
            self._groups.append(rest)
        if self._consecutive_failures >= self.max_consecutive_failures:
            self._declare_fault(f"{self._consecutive_failures} steps failed in a row (last: {error})", verdict)
        return verdict

    def record_success(self, caught_up: Iterable[str]) -> None:
        """A step succeeded; ``caught_up``: the scheduled requests that computed every token (or finished)."""
        self._consecutive_failures = 0
        if not self._groups:  # a normal step: whatever failed before does not fail now
            self._rounds_without_culprit = 0
            self.engine_fault = None
            return
        cleared = set(caught_up)
        remaining = [request_id for request_id in self._groups[0] if request_id not in cleared]
        if remaining:
            self._groups[0] = remaining
        else:
            self._groups.popleft()
            self._end_round_if_done()

    def _take_from_probe(self, scheduled: list[str]) -> list[str]:
        """Remove the probe group (when probing) and return its members that did not run in the failed step."""
        if not self._groups:
            return []
        ran = set(scheduled)
        return [request_id for request_id in self._groups.popleft() if request_id not in ran]

    def _end_round_if_done(self) -> None:
        if self._groups:
            return
        if self._round_found_culprit:
            self._rounds_without_culprit = 0
            return
        self._rounds_without_culprit += 1
        if self._rounds_without_culprit >= 2 and self.engine_fault is None:
            self.engine_fault = "steps keep failing, but never with a single request: no culprit found"
            logger.error("Engine fault: %s; requests involved: %s", self.engine_fault, self._round_suspects)

    def _declare_fault(self, reason: str, verdict: FailureVerdict) -> None:
        verdict.engine_fault = self.engine_fault = reason
        verdict.given_up = [request_id for group in self._groups for request_id in group]
        verdict.given_up += [request_id for request_id in verdict.culprits if request_id not in verdict.given_up]
        verdict.culprits = []
        logger.error("Engine fault: %s; giving up on requests %s", reason, verdict.given_up)
        self._groups.clear()
        self._consecutive_failures = 0
