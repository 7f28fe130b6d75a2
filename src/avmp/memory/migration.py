"""Deciding how to find room: reserve chunks first, then migration, compacting the
donor's tail when its free units are not at its tail.

Planning reads the pools and changes nothing, so an allocation that cannot be satisfied
is refused before any chunk or unit moves (the manager's calls stay atomic).

The plan and event records are NamedTuples rather than frozen dataclasses: they are
built on the allocation path, and a tuple is several times cheaper to create.
"""

from __future__ import annotations

from typing import NamedTuple

from avmp.memory.pool import Pool
from avmp.memory.spec import PoolKind


class Migration(NamedTuple):
    """Move ``num_chunks`` tail chunks of ``donor`` to the tail of ``recipient``,
    after copying the donor's live tail units as ``moves`` (``(src, dst)`` pairs)."""

    donor: PoolKind
    recipient: PoolKind
    num_chunks: int
    moves: list[tuple[int, int]]


class RoomPlan(NamedTuple):
    """What to do before an allocation: reserve chunks per pool, then one migration."""

    reserve_kv: int
    reserve_state: int
    migration: Migration | None


class MemoryEvent(NamedTuple):
    """One capacity change, for reports and the simulator's time model.

    ``kind`` is ``"reserve"`` (chunks taken from the unowned reserve), ``"compaction"``
    (live units copied inside ``pool``) or ``"migration"`` (chunks moved to ``pool``).
    ``num_bytes`` is what a time model charges: bytes copied for a compaction, bytes
    mapped (no copy) for a reserve take or a migration. Events are appended in order;
    a caller attributes them to a call by comparing ``len(manager.events)`` around it.
    """

    kind: str
    pool: PoolKind
    num_chunks: int
    num_units_moved: int
    num_bytes: int


def plan_room(
    kv: Pool, state: Pool, num_pages: int, num_slots: int, reserve_size: int, batch_chunks: int
) -> RoomPlan | None:
    """Plan how the pools get room for ``num_pages`` more pages and ``num_slots`` more
    slots.

    A short pool takes the fewest reserve chunks covering its shortfall plus
    ``batch_chunks`` (as far as the reserve goes). If the reserve runs dry, the rest
    migrates from the other pool's tail, which must keep room for its own demand.

    Returns:
        The plan, or None if no plan covers the demand (an OOM event).
    """
    short_kv = kv.chunks_short(num_pages)
    short_state = state.chunks_short(num_slots)
    if short_kv and short_state:
        if short_kv + short_state > reserve_size:
            return None  # each pool needs chunks, so neither can donate
        spare = reserve_size - short_kv - short_state
        extra_state = min(batch_chunks, spare)
        extra_kv = min(batch_chunks, spare - extra_state)
        return RoomPlan(short_kv + extra_kv, short_state + extra_state, None)
    if short_kv:
        recipient, donor, needed, donor_demand = kv, state, short_kv, num_slots
    else:
        recipient, donor, needed, donor_demand = state, kv, short_state, num_pages
    from_reserve = min(reserve_size, needed + batch_chunks)
    migration = None
    if from_reserve < needed:
        migration = _plan_migration(donor, recipient.kind, needed - from_reserve, donor_demand,
                                    batch_chunks)
        if migration is None:
            return None
    if recipient is kv:
        return RoomPlan(from_reserve, 0, migration)
    return RoomPlan(0, from_reserve, migration)


def _plan_migration(
    donor: Pool, recipient: PoolKind, needed: int, donor_demand: int, batch_chunks: int
) -> Migration | None:
    """The fewest donor tail chunks covering ``needed``: free ones plus the batch when the
    tail is free enough, else exactly ``needed`` after compacting the tail."""
    donatable = donor.max_donatable(donor_demand)
    if donatable < needed:
        return None
    free_tail = min(donor.free_tail_chunks(), donatable)
    if free_tail >= needed:
        return Migration(donor.kind, recipient, min(needed + batch_chunks, free_tail), [])
    moves = donor.plan_compaction(len(donor.chunks) - needed)
    return Migration(donor.kind, recipient, needed, moves)
