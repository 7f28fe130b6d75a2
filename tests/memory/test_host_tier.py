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
