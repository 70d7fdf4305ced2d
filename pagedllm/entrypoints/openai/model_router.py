"""Weighted aliases for A/B tests: a request for an alias goes to one of its target models.

``aliases: {chat: {A: 90, B: 10}}`` sends about 90% of the requests for ``chat`` to A. A request with a ``user``
always goes to the same target (a hash of the alias and the user picks it: a user sees one model during a test);
one without a user takes the next point of a golden-ratio sequence from a seeded random start, which spreads the
points evenly: any run of N such requests is within a few requests of the weights, where independent draws would
stray by ~sqrt(N) (3% of 1,000 requests is two standard deviations of a random 50/50 split). Targets that are not
serving (failed, dead, unloading) are left out of the draw, so an alias keeps answering while one of its targets is
down.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate

_HASH_SPAN = float(1 << 64)
_GOLDEN_RATIO_STEP = 0.6180339887498949  # (sqrt(5) - 1) / 2: the most evenly spreading step modulo 1


@dataclass(frozen=True)
class Alias:
    """An alias name and its targets' weights (positive)."""

    name: str
    weights: tuple[tuple[str, float], ...]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(target for target, _ in self.weights)

    def pick(self, point: float, is_serving: Callable[[str], bool] = lambda _: True) -> str | None:
        """The target at ``point`` (in [0, 1)) of the serving targets' cumulative weights; None if none serves."""
        live = [(target, weight) for target, weight in self.weights if is_serving(target)]
        if not live:
            return None
        bounds = list(accumulate(weight for _, weight in live))
        index = bisect_right(bounds, point * bounds[-1])
        return live[min(index, len(live) - 1)][0]


def sticky_point(alias: str, user: str) -> float:
    """A user's fixed point in [0, 1) for ``alias`` (sha256: the same on every server and every run)."""
    digest = hashlib.sha256(f"{alias}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_SPAN


class AliasRouter:
    """Resolves alias names to target served names."""

    def __init__(self, aliases: Mapping[str, Mapping[str, float]], seed: int = 0) -> None:
        self.aliases = {name: Alias(name, tuple(weights.items())) for name, weights in aliases.items()}
        self._next_point = random.Random(seed).random()  # seeded: a test (or a replay) sees the same split

    def __contains__(self, name: object) -> bool:
        return name in self.aliases

    def resolve(self, alias: str, user: str | None, is_serving: Callable[[str], bool] = lambda _: True) -> str | None:
        """The target served name for a request for ``alias`` from ``user``; None if no target serves. Raises
        KeyError for a name that is not an alias."""
        chosen = self.aliases[alias]  # KeyError before the sequence moves
        return chosen.pick(self._even_point() if user is None else sticky_point(alias, user), is_serving)

    def _even_point(self) -> float:
        point = self._next_point
        self._next_point = (point + _GOLDEN_RATIO_STEP) % 1.0
        return point
