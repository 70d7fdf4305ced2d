"""Which data-parallel replica (engine core) a request goes to: the fewest outstanding requests, with prefix-cache
affinity inside a load bound.

The rule (``ReplicaRouter.choose``):

1. Only live replicas count (a dead or stalled core is skipped; none left: ``NoLiveReplicaError``).
2. A request without an affinity key (a prompt shorter than one KV block) goes to a least-loaded replica; ties
   rotate round-robin, so equal replicas take turns.
3. A request with a key (a hash of its first ``AFFINITY_BLOCKS`` full KV blocks of prompt tokens, see
   ``affinity_key``) may go to any replica whose load is within the bound ``least + slack`` (``slack`` =
   ``max(min_slack, slack_fraction * least)``); among those, rendezvous hashing (highest random weight of
   (key, replica)) picks one. So requests sharing a prefix go to the same replica, where its KV blocks are cached,
   as long as that replica is at most ``slack`` requests busier than the least-loaded one; past the bound they
   spill to the next replica in the key's own rendezvous order (the same one for every request of that prefix),
   and a dead replica's keys move to the others without disturbing anyone else's.

This is consistent hashing with bounded loads over a handful of replicas: no ring, one hash per live replica per
request. "Outstanding" is counted here (``start`` / ``finish`` around each request), exact and free, rather than
read from the engines' gauges, which lag a step behind.

Pure Python (no torch): tested in milliseconds.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

AFFINITY_BLOCKS = 4  # the key covers up to this many full KV blocks of the prompt (64 tokens at block size 16)
DEFAULT_MIN_SLACK = 2  # a replica this many requests busier than the least-loaded one still keeps its prefixes
DEFAULT_SLACK_FRACTION = 0.125  # ... or this share of the least load, when that is more
_TEXT_AFFINITY_CHARS = 256  # a prompt given as text only (no token ids): its first characters make the key


class NoLiveReplicaError(RuntimeError):
    """No replica can take the request (all dead, stalled or draining)."""


def affinity_key(prompt: object, block_size: int) -> bytes | None:
    """The prefix a request's affinity follows: its first full KV blocks of prompt token ids (up to
    ``AFFINITY_BLOCKS``), as an 8-byte digest; None for a prompt shorter than one block. A prompt given only as
    text keys on its first characters. Requests with the same key share at least those blocks in the prefix cache."""
    token_ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    if token_ids is not None:
        num_tokens = min(len(token_ids) // block_size, AFFINITY_BLOCKS) * block_size
        if num_tokens == 0:
            return None
        data = array("q", token_ids[:num_tokens]).tobytes()
    else:
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str) or len(text) < _TEXT_AFFINITY_CHARS:
            return None
        data = text[:_TEXT_AFFINITY_CHARS].encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=8).digest()


def rendezvous_score(key: bytes, replica: int) -> int:
    """The replica's weight for ``key``: the key goes to the highest-weighted replica within the load bound."""
    digest = hashlib.blake2b(key + replica.to_bytes(4, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class ReplicaRouter:
    """Counts each replica's outstanding requests and picks the replica of the next one (see the module doc)."""

    def __init__(self, num_replicas: int, min_slack: int = DEFAULT_MIN_SLACK,
                 slack_fraction: float = DEFAULT_SLACK_FRACTION) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if min_slack < 0 or slack_fraction < 0:
            raise ValueError(f"min_slack and slack_fraction must be >= 0, got {min_slack} and {slack_fraction}")
        self.num_replicas = num_replicas
        self.min_slack = min_slack
        self.slack_fraction = slack_fraction
        self.outstanding = [0] * num_replicas
        self.num_routed = [0] * num_replicas  # requests sent to each replica so far
        self._next_turn = 0  # where the round-robin of keyless ties starts

    def choose(self, key: bytes | None, is_live: Sequence[bool] | None = None) -> int:
        """The replica for a request with affinity ``key`` (None: none), among those ``is_live`` marks (all if
        None). Does not count the request: call ``start`` once it is sent."""
        live = [index for index in range(self.num_replicas) if is_live is None or is_live[index]]
        if not live:
            raise NoLiveReplicaError("no data-parallel engine is live")
        least = min(self.outstanding[index] for index in live)
        if key is None:
            return self._next_least_loaded(live, least)
        bound = least + self.slack(least)
        within = [index for index in live if self.outstanding[index] <= bound]
        return max(within, key=lambda index: rendezvous_score(key, index))

    def slack(self, least: int) -> int:
        """How many more outstanding requests than the least-loaded replica a preferred replica may have."""
        return max(self.min_slack, int(self.slack_fraction * least))

    def _next_least_loaded(self, live: list[int], least: int) -> int:
        """The first least-loaded live replica at or after the round-robin turn."""
        for step in range(self.num_replicas):
            index = (self._next_turn + step) % self.num_replicas
            if index in live and self.outstanding[index] == least:
                self._next_turn = (index + 1) % self.num_replicas
                return index
        raise AssertionError("a live replica has the least load")  # unreachable: ``least`` is one of theirs

    def start(self, replica: int) -> None:
        """A request was sent to ``replica``."""
        self.outstanding[replica] += 1
        self.num_routed[replica] += 1

    def finish(self, replica: int) -> None:
        """A request of ``replica`` ended (finished, aborted or failed)."""
        self.outstanding[replica] -= 1
