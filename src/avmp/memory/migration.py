"""Deciding how to find room: reserve chunks first, then migration, compacting the
donor's tail when its free units are not at its tail; and how many free chunks beyond
the demand a migration moves (`MigrationHistory`, the "streak" policy).

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


STREAK_WINDOW_CALLS = 2048
"""Allocator calls within which two migrations count as one streak (or as a reversal).
About ten decode steps of 200 running requests, each growing once per step."""


class MigrationHistory:
    """The last migration into each pool, by allocator call, from which the "streak"
    policy sizes a migration's extra chunks.

    A pool that keeps receiving chunks (the demand holds one direction: long prompts
    filling the KV pool, a burst of admissions the state pool) receives, on top of its
    shortfall, as many chunks as its streak has received so far, so n small migrations
    become about log2(n). A pool that received chunks within the window gives no extra
    away (hysteresis: it needed them, so taking more than the demand would only make it
    take them back). The extra comes from the donor's free tail only, at most half of
    what is spare there, so it never costs a copy and never decides whether a call fits.
    """

    __slots__ = ("window_calls", "last_call", "last_recipient", "streak_chunks")

    def __init__(self, window_calls: int = STREAK_WINDOW_CALLS) -> None:
        self.window_calls = window_calls
        never = -window_calls - 1
        self.last_call = {PoolKind.KV: never, PoolKind.STATE: never}
        self.last_recipient: PoolKind | None = None
        self.streak_chunks = 0

    def extra_chunks(self, recipient: PoolKind, now: int) -> int:
        """Chunks to move into ``recipient`` beyond its shortfall at call ``now``."""
        if now - self.last_call[recipient.other] <= self.window_calls:
            return 0  # the donor needed chunks itself a moment ago
        if self.last_recipient is not recipient:
            return 0
        if now - self.last_call[recipient] > self.window_calls:
            return 0  # the streak lapsed
        return self.streak_chunks

    def record(self, recipient: PoolKind, num_chunks: int, now: int) -> None:
        """Note that ``num_chunks`` chunks migrated into ``recipient`` at call ``now``."""
        in_streak = (
            self.last_recipient is recipient
            and now - self.last_call[recipient] <= self.window_calls
        )
        self.streak_chunks = self.streak_chunks + num_chunks if in_streak else num_chunks
        self.last_recipient = recipient
        self.last_call[recipient] = now


def plan_room(
    kv: Pool,
    state: Pool,
    num_pages: int,
    num_slots: int,
    reserve_size: int,
    batch_chunks: int,
    extra_chunks: tuple[int, int] = (0, 0),
) -> RoomPlan | None:
    """Plan how the pools get room for ``num_pages`` more pages and ``num_slots`` more
    slots.

    A short pool takes the fewest reserve chunks covering its shortfall plus
    ``batch_chunks`` (as far as the reserve goes). If the reserve runs dry, the rest
    migrates from the other pool's tail, which must keep room for its own demand.
    ``extra_chunks`` (into KV, into state) may enlarge a migration that needs no
    compaction, up to half of the donor's free tail beyond the demand.

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
        extra = extra_chunks[0]
    else:
        recipient, donor, needed, donor_demand = state, kv, short_state, num_pages
        extra = extra_chunks[1]
    from_reserve = min(reserve_size, needed + batch_chunks)
    migration = None
    if from_reserve < needed:
        migration = _plan_migration(donor, recipient.kind, needed - from_reserve, donor_demand,
                                    batch_chunks, extra)
        if migration is None:
            return None
    if recipient is kv:
        return RoomPlan(from_reserve, 0, migration)
    return RoomPlan(0, from_reserve, migration)


def _plan_migration(
    donor: Pool,
    recipient: PoolKind,
    needed: int,
    donor_demand: int,
    batch_chunks: int,
    extra_chunks: int,
) -> Migration | None:
    """The fewest donor tail chunks covering ``needed``: free ones plus the batch (or the
    extra, bounded by half the spare free tail, whichever is more) when the tail is free
    enough, else exactly ``needed`` after compacting the tail."""
    donatable = donor.max_donatable(donor_demand)
    if donatable < needed:
        return None
    free_tail = min(donor.free_tail_chunks(), donatable)
    if free_tail >= needed:
        spare = free_tail - needed
        beyond = max(min(batch_chunks, spare), min(extra_chunks, spare // 2))
        return Migration(donor.kind, recipient, needed + beyond, [])
    moves = donor.plan_compaction(len(donor.chunks) - needed)
    return Migration(donor.kind, recipient, needed, moves)
