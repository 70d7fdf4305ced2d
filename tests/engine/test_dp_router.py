"""The data-parallel router: least outstanding requests, prefix affinity within a load bound, ties, dead replicas."""

from __future__ import annotations

import pytest

from pagedllm.engine.dp_router import (
    AFFINITY_BLOCKS,
    NoLiveReplicaError,
    ReplicaRouter,
    affinity_key,
    rendezvous_score,
)

BLOCK = 16


def _key(seed: int) -> bytes:
    return affinity_key({"prompt_token_ids": [seed] * (2 * BLOCK)}, BLOCK)


def test_keyless_requests_go_to_the_least_loaded():
    router = ReplicaRouter(3)
    router.outstanding[:] = [4, 1, 2]
    assert router.choose(None) == 1


def test_keyless_ties_take_turns():
    router = ReplicaRouter(3)
    picks = [router.choose(None) for _ in range(6)]  # nobody starts a request: loads stay equal
    assert picks == [0, 1, 2, 0, 1, 2]


def test_keyless_turns_skip_busier_replicas():
    router = ReplicaRouter(3)
    router.outstanding[:] = [0, 5, 0]
    assert [router.choose(None) for _ in range(4)] == [0, 2, 0, 2]


def test_balanced_under_a_stream_of_keyless_requests():
    router = ReplicaRouter(4)
    for _ in range(100):
        router.start(router.choose(None))
    assert router.outstanding == [25, 25, 25, 25]


def test_same_prefix_goes_to_the_same_replica_at_equal_load():
    router = ReplicaRouter(4)
    shared = list(range(100, 100 + AFFINITY_BLOCKS * BLOCK))
    picks = {router.choose(affinity_key({"prompt_token_ids": shared + tail}, BLOCK))
             for tail in ([1, 2], [3] * 40, [7] * 5)}
    assert len(picks) == 1


def test_affinity_key_covers_only_the_first_blocks():
    head = list(range(AFFINITY_BLOCKS * BLOCK))
    assert affinity_key({"prompt_token_ids": head + [1]}, BLOCK) == affinity_key({"prompt_token_ids": head + [2]},
                                                                                 BLOCK)
    assert affinity_key({"prompt_token_ids": [5] * (BLOCK - 1)}, BLOCK) is None  # no full block: no key
    assert affinity_key({"prompt_token_ids": [5] * BLOCK}, BLOCK) != affinity_key({"prompt_token_ids": [6] * BLOCK},
                                                                                  BLOCK)
    assert affinity_key("short text", BLOCK) is None
    assert affinity_key({"prompt": "x" * 300}, BLOCK) == affinity_key("x" * 300 + "tail", BLOCK)


def test_affinity_holds_within_the_slack_and_spills_past_it():
    router = ReplicaRouter(2, min_slack=2, slack_fraction=0.0)
    key = _key(7)
    preferred = router.choose(key)
    other = 1 - preferred
    router.outstanding[preferred] = 2  # 2 more than the other: still within the bound
    assert router.choose(key) == preferred
    router.outstanding[preferred] = 3  # past it: the least-loaded one takes the request
    assert router.choose(key) == other


def test_slack_grows_with_load():
    router = ReplicaRouter(2, min_slack=2, slack_fraction=0.125)
    assert router.slack(0) == 2
    assert router.slack(80) == 10


def test_different_prefixes_spread_over_replicas():
    router = ReplicaRouter(2)
    picks = [router.choose(_key(seed)) for seed in range(32)]
    assert 8 <= picks.count(0) <= 24  # a hash split, not one replica


def test_keys_of_a_dead_replica_move_and_no_others_do():
    router = ReplicaRouter(3)
    keys = [_key(seed) for seed in range(30)]
    before = [router.choose(key) for key in keys]
    after = [router.choose(key, [True, False, True]) for key in keys]
    for old, new in zip(before, after):
        assert new != 1
        if old != 1:
            assert new == old  # rendezvous hashing: only the dead replica's keys move


def test_dead_replicas_are_skipped():
    router = ReplicaRouter(3)
    router.outstanding[:] = [5, 0, 5]
    assert router.choose(None, [True, False, True]) in (0, 2)
    assert router.choose(_key(3), [False, False, True]) == 2
    with pytest.raises(NoLiveReplicaError):
        router.choose(None, [False, False, False])


def test_start_and_finish_count_outstanding_and_routed():
    router = ReplicaRouter(2)
    router.start(1)
    router.start(1)
    router.finish(1)
    assert router.outstanding == [0, 1]
    assert router.num_routed == [0, 2]


def test_rendezvous_score_is_stable():
    assert rendezvous_score(b"12345678", 0) == rendezvous_score(b"12345678", 0)
    assert rendezvous_score(b"12345678", 0) != rendezvous_score(b"12345678", 1)


@pytest.mark.parametrize("kwargs", [{"num_replicas": 0}, {"num_replicas": 2, "min_slack": -1}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        ReplicaRouter(**kwargs)
