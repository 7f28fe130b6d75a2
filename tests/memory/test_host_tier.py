"""The host tier's extent bookkeeping: first fit, alignment, merging, running out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory.host_tier import ALIGNMENT_BYTES, HostExtent, HostTier

A = ALIGNMENT_BYTES


def test_extents_are_aligned_first_fit_and_keep_their_exact_size() -> None:
    tier = HostTier(10 * A)
    first = tier.reserve(1, 100)
    second = tier.reserve(2, A + 1)
    assert first == HostExtent(0, 100) and first.reserved_bytes == A
    assert second == HostExtent(A, A + 1) and second.reserved_bytes == 2 * A
    assert tier.used_bytes == 3 * A and tier.free_bytes == 7 * A
    tier.release(1)
    assert tier.reserve(3, A) == HostExtent(0, A)  # the first hole that fits
    tier.check_integrity()


def test_running_out_is_none_and_changes_nothing() -> None:
    tier = HostTier(4 * A)
    assert tier.reserve(1, 3 * A) is not None
    assert not tier.could_reserve(2 * A)
    assert tier.reserve(2, 2 * A) is None
    assert tier.used_bytes == 3 * A and not tier.holds(2)
    assert HostTier(0).reserve(1, 1) is None


def test_released_neighbours_merge_into_one_extent() -> None:
    tier = HostTier(3 * A)
    for request_id in range(3):
        tier.reserve(request_id, A)
    tier.release(0)
    tier.release(2)
    assert tier.reserve(9, 2 * A) is None  # two holes of one page each
    tier.release(1)
    assert tier.reserve(9, 3 * A) == HostExtent(0, 3 * A)
    tier.check_integrity()


def test_misuse_raises() -> None:
    tier = HostTier(4 * A)
    tier.reserve(1, 10)
    with pytest.raises(ValueError, match="already holds"):
        tier.reserve(1, 10)
    with pytest.raises(ValueError, match="at least 1 byte"):
        tier.reserve(2, 0)
    with pytest.raises(KeyError, match="holds nothing of request 5"):
        tier.release(5)
    with pytest.raises(ValueError, match=">= 0"):
        HostTier(-1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(1, 5 * A)), max_size=80))
def test_random_reserves_and_releases_tile_the_arena(
    operations: list[tuple[bool, int, int]],
) -> None:
    tier = HostTier(16 * A)
    for reserve, request_id, num_bytes in operations:
        if reserve and not tier.holds(request_id):
            fits = tier.could_reserve(num_bytes)
            extent = tier.reserve(request_id, num_bytes)
            assert (extent is not None) == fits
            if extent is not None:
                assert extent.offset % A == 0 and extent.num_bytes == num_bytes
        elif not reserve and tier.holds(request_id):
            tier.release(request_id)
        tier.check_integrity()
    assert tier.used_bytes <= tier.capacity_bytes


# ---- cached checkpoints (the prefix cache's second level) --------------------------------


def test_cached_extents_share_the_arena_under_their_own_keys() -> None:
    tier = HostTier(4 * A)
    assert tier.reserve(1, A) == HostExtent(0, A)
    assert tier.reserve_cached(1, A) == HostExtent(A, A)  # key 1 is not request 1
    assert tier.request_ids == [1] and tier.cached_keys == [1]
    assert tier.cached_bytes == A and tier.used_bytes == 2 * A
    assert tier.reserve_cached(2, 3 * A) is None  # a cached checkpoint displaces nothing
    assert tier.could_reserve_cached(2 * A) and not tier.could_reserve_cached(3 * A)
    assert tier.release_cached(1) == HostExtent(A, A)
    assert tier.cached_keys == [] and tier.used_bytes == A
    tier.check_integrity()
    with pytest.raises(KeyError, match="no cached checkpoint 1"):
        tier.release_cached(1)
    tier.reserve_cached(3, 10)
    with pytest.raises(ValueError, match="already holds"):
        tier.reserve_cached(3, 10)


def test_a_request_makes_cached_checkpoints_give_way() -> None:
    """Swapped-out requests come first: `reserve` drops cached extents through the
    reclaimer, as many as it takes; `could_reserve` counts what they would free."""
    tier = HostTier(4 * A)
    for key in range(4):
        tier.reserve_cached(key, A)
    dropped: list[int] = []

    def reclaim() -> bool:
        if not tier.cached_keys:
            return False
        key = tier.cached_keys[-1]  # the highest offset first: a run forms at the end
        tier.release_cached(key)
        dropped.append(key)
        return True

    assert not tier.could_reserve(2 * A)  # no reclaimer: cached extents stay
    assert tier.reserve(7, 2 * A) is None and not dropped
    tier.reclaim_cached = reclaim
    assert tier.could_reserve(2 * A) and tier.could_reserve(4 * A)
    assert not tier.could_reserve(5 * A)
    assert tier.reserve(7, 2 * A) == HostExtent(2 * A, 2 * A)
    assert dropped == [3, 2] and tier.cached_keys == [0, 1]
    tier.check_integrity()


def test_could_reserve_with_cached_extents_needs_one_contiguous_run() -> None:
    tier = HostTier(4 * A)
    tier.reserve_cached(0, A)
    tier.reserve(1, A)  # a request's extent splits the arena
    tier.reserve_cached(2, 2 * A)
    tier.reclaim_cached = lambda: False
    assert tier.could_reserve(2 * A)  # the cached run at the end
    assert not tier.could_reserve(3 * A)  # cached + free + cached, but a request between


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 7), st.integers(1, 3 * A)),
                max_size=80))  # fmt: skip
def test_random_requests_and_cached_extents_tile_the_arena(
    operations: list[tuple[int, int, int]],
) -> None:
    """Requests, cached checkpoints and a reclaimer that drops the oldest cached key:
    `could_reserve` predicts `reserve`, and the extents always tile the arena."""
    tier = HostTier(12 * A)

    def reclaim() -> bool:
        keys = tier.cached_keys
        if keys:
            tier.release_cached(keys[0])
        return bool(keys)

    tier.reclaim_cached = reclaim
    for kind, key, num_bytes in operations:
        if kind == 0 and not tier.holds(key):
            fits = tier.could_reserve(num_bytes)
            assert (tier.reserve(key, num_bytes) is not None) == fits
        elif kind == 1 and tier.holds(key):
            tier.release(key)
        elif kind == 2 and key not in tier.cached_keys:
            fits = tier.could_reserve_cached(num_bytes)
            assert (tier.reserve_cached(key, num_bytes) is not None) == fits
        elif kind == 3 and key in tier.cached_keys:
            tier.release_cached(key)
        tier.check_integrity()
