"""One pool's bookkeeping, the address arithmetic and the chunk reserve, by hand."""

from __future__ import annotations

from array import array

import pytest

from avmp.memory.address_space import (
    ChunkReserve,
    chunks_for_units,
    unit_spans,
    units_for_chunks,
)
from avmp.memory.pool import Pool
from avmp.memory.spec import PoolKind

CHUNK = 100  # a pool only does arithmetic on chunk_bytes, so small numbers read better


def pool_with(unit_bytes: int, chunk_ids: list[int]) -> Pool:
    pool = Pool(PoolKind.KV, unit_bytes, CHUNK)
    pool.add_chunks(chunk_ids)
    return pool


def live_units(pool: Pool) -> list[int]:
    return [i for i, free in enumerate(pool.free_map) if not free]


def test_capacity_is_floor_of_owned_bytes() -> None:
    assert units_for_chunks(3, 40, CHUNK) == 7  # 300 bytes: 7 units, the last straddling
    assert units_for_chunks(1, 250, CHUNK) == 0
    assert units_for_chunks(3, 250, CHUNK) == 1
    assert units_for_chunks(5, 0, CHUNK) == 0
    assert chunks_for_units(7, 40, CHUNK) == 3
    assert chunks_for_units(8, 40, CHUNK) == 4
    assert chunks_for_units(0, 40, CHUNK) == 0
    assert chunks_for_units(2, 250, CHUNK) == 5


def test_unit_spans_cross_chunk_boundaries() -> None:
    assert unit_spans(0, 40, CHUNK) == [(0, 0, 40)]
    assert unit_spans(2, 40, CHUNK) == [(0, 80, 100), (1, 0, 20)]
    assert unit_spans(1, 250, CHUNK) == [(2, 50, 100), (3, 0, 100), (4, 0, 100)]
    assert unit_spans(4, 25, CHUNK) == [(1, 0, 25)]


def test_lowest_free_unit_first() -> None:
    pool = pool_with(40, [7, 3])  # 5 units
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate_one() == 2
    pool.release(array("q", [0]))
    pool.release(array("q", [2]))
    assert pool.allocate(3) == [0, 2, 3]
    assert pool.num_free == 1
    pool.check_integrity([0, 1, 2, 3])


def test_allocate_takes_runs_across_holes() -> None:
    pool = pool_with(10, [0, 1])  # 20 units
    assert pool.allocate(20) == list(range(20))
    pool.release(array("q", [3, 4, 9, 15, 16, 17]))
    assert pool.allocate(4) == [3, 4, 9, 15]
    assert pool.allocate(2) == [16, 17]
    assert pool.num_free == 0
    pool.check_integrity(list(range(20)))


def test_add_chunks_frees_the_units_they_complete() -> None:
    pool = pool_with(40, [0])  # 2 units, 20 bytes of the chunk left over
    assert pool.num_units == 2
    pool.add_chunks([5])  # 200 bytes: 5 units, unit 2 straddles the two chunks
    assert pool.num_units == 5 and pool.num_free == 5
    assert pool.chunks == [0, 5]


def test_remove_tail_chunks_requires_a_free_tail() -> None:
    pool = pool_with(40, [0, 1, 2])  # 7 units
    pool.allocate(5)  # unit 4 spans bytes 160..200: the second chunk
    pool.release(array("q", [4]))
    assert pool.free_tail_chunks() == 1  # chunk 2 holds units 5, 6 (both free)
    assert pool.remove_tail_chunks(1) == [2]
    assert pool.num_units == 5 and pool.num_free == 1
    with pytest.raises(AssertionError):
        pool.remove_tail_chunks(1)  # unit 3 (120..160) is live in chunk 1
    pool.check_integrity([0, 1, 2, 3])


def test_shortfall_and_donatable_chunks() -> None:
    pool = pool_with(40, [0, 1])  # 5 units
    pool.allocate(3)
    assert pool.chunks_short(2) == 0
    assert pool.chunks_short(3) == 1  # 6 units need 240 bytes: 3 chunks
    assert pool.chunks_short(5) == 2  # 8 units: 320 bytes
    assert pool.max_donatable(0) == 0  # 3 units need 120 bytes: 2 chunks
    pool.release(array("q", [1, 2]))
    assert pool.max_donatable(0) == 1
    assert pool.max_donatable(2) == 0


def test_plan_compaction_moves_tail_units_to_lowest_holes() -> None:
    pool = pool_with(25, [0, 1, 2])  # 12 units, 4 per chunk
    pool.allocate(12)
    pool.release(array("q", [0, 2, 5, 6, 7, 8, 11]))  # live: 1, 3, 4, 9, 10
    assert pool.free_tail_chunks() == 0
    moves = pool.plan_compaction(keep_chunks=2)
    assert moves == [(9, 0), (10, 2)]
    pool.apply_moves(moves)
    assert live_units(pool) == [0, 1, 2, 3, 4]
    assert pool.free_tail_chunks() == 1
    assert pool.remove_tail_chunks(1) == [2]
    pool.check_integrity([0, 1, 2, 3, 4])


def test_plan_compaction_refuses_when_the_kept_chunks_are_full() -> None:
    pool = pool_with(50, [0, 1])  # 4 units
    pool.allocate(4)
    pool.release(array("q", [3]))
    with pytest.raises(AssertionError):
        pool.plan_compaction(keep_chunks=1)


def test_integrity_catches_a_unit_owned_twice() -> None:
    pool = pool_with(50, [0])
    pool.allocate(2)
    with pytest.raises(AssertionError, match="owned twice"):
        pool.check_integrity([1, 1])
    with pytest.raises(AssertionError, match="used count"):
        pool.check_integrity([1])


def test_reserve_hands_out_lowest_chunks_first() -> None:
    reserve = ChunkReserve(5)
    assert reserve.take(2) == [0, 1]
    assert len(reserve) == 3
    reserve.give_back([1])
    assert reserve.chunk_ids == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        reserve.take(5)


def test_releases_are_flushed_before_the_map_is_read() -> None:
    pool = pool_with(10, [0])  # 10 units
    pool.allocate(10)
    pool.release(array("q", [7, 2]))
    pool.release(array("q", [5]))
    assert pool.num_free == 3  # counted at once
    assert pool.free_map[2] == 0 and pool.low == 10  # written only on the next read
    pool.flush()
    assert pool.low == 2
    assert pool.allocate(2) == [2, 5]
    assert pool.allocate_one() == 7
    pool.check_integrity(list(range(10)))


def test_release_one_is_written_at_once_beside_queued_releases() -> None:
    """A slot freed with release_one is free in the map at once; units queued before it
    are written by the next read, and the low mark ends at the lowest of both."""
    pool = pool_with(10, [0])  # 10 units
    pool.allocate(10)
    pool.release(array("q", [8, 3]))
    pool.release_one(6)
    assert pool.free_map[6] == 1 and pool.free_map[3] == 0 and pool.low == 6
    assert pool.num_free == 3
    pool.flush()
    assert pool.low == 3
    assert pool.allocate(3) == [3, 6, 8]
    pool.release_one(9)
    pool.release(array("q", [4]))  # above the mark: the mark stays at the slot's unit...
    pool.release(array("q", [7]))  # ...until the queued ones are written, also above it
    pool.flush()
    assert pool.low == 4  # the lowest free unit, found in the map
    pool.check_integrity([0, 1, 2, 3, 5, 6, 8])


def test_flush_lowers_the_low_mark_only_to_a_released_unit_below_it() -> None:
    pool = pool_with(10, [0])
    pool.allocate(4)  # 0..3 taken, low mark 4
    pool.release(array("q", [2, 3]))
    pool.allocate(6)  # flushes first: 2 and 3 are free again, so they go first
    assert pool.low == 8 and pool.num_free == 2
    pool.release(array("q", [7, 5]))
    pool.flush()
    assert pool.low == 5
    pool.release(array("q", [6]))  # above the mark: it stays
    pool.flush()
    assert pool.low == 5
    pool.check_integrity([0, 1, 2, 3, 4])
