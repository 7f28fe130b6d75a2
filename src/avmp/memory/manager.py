"""The AVMP manager: two pools of exact unit sizes sharing one budget of physical chunks,
which move between the pools only when an allocation fails.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from typing import NoReturn

from avmp.memory.address_space import ChunkReserve
from avmp.memory.backing.base import Backing
from avmp.memory.cached import CachedUnits
from avmp.memory.migration import MemoryEvent, Migration, MigrationHistory, RoomPlan, plan_room
from avmp.memory.pool import Pool
from avmp.memory.requests import RecentFrees, check_num_tokens, check_request_id
from avmp.memory.spec import (
    AllocatorError,
    CacheAllocator,
    CacheSpec,
    DuplicateRequestError,
    MemoryConfig,
    MemoryUsage,
    PoolKind,
    RequestTooLargeError,
    RequestUnits,
)
from avmp.models.geometry import ModelGeometry
from avmp.units import ceil_div


class _Request:
    """One live request's handle table: its slot and its pages in token order.

    The engine's handles are ``request_id`` (the slot) and ``(request_id, i)`` (the i-th
    page); they never change. Compaction rewrites the physical indices stored here.
    """

    __slots__ = ("slot", "pages", "num_tokens", "num_adopted")

    def __init__(self, slot: int, pages: array[int], num_tokens: int, num_adopted: int) -> None:
        self.slot = slot
        # an array('q') rather than a list: `Pool.release` frees it with one numpy scatter
        self.pages = pages
        self.num_tokens = num_tokens
        self.num_adopted = num_adopted  # leading pages adopted from the prefix cache


class AvmpManager(CacheAllocator):
    """Asymmetric Virtual Memory Paging over a KV pool of pages and a state pool of slots.

    Every chunk starts in an unowned reserve. A pool that cannot satisfy an allocation
    takes reserve chunks; once the reserve is empty it migrates whole free chunks from
    the other pool's tail, compacting that tail first if its live units sit there. If
    nothing covers the demand the call returns None and changes nothing.
    ``config.migration_policy`` sizes what a migration moves beyond the demand
    (`avmp.memory.migration.MigrationHistory`); whether a call fits never depends on it.

    Without a backing this is pure bookkeeping (the simulator's case); with one, every
    chunk mapping and unit copy is carried out on it.

    A model without recurrent layers gets slot ``-1``; one without attention, no pages.

    Args:
        backing: where the bytes live; None for bookkeeping only.
        fixed_state_fraction: None for AVMP. A fraction F gives SGLang's static split
            instead ("static"): at start-up the state pool gets ``round(F * num_chunks)``
            chunks and the KV pool the rest, and nothing moves afterwards, so a short pool
            fails the allocation even when the other is empty.
        padding_slot: static only. Hold one state slot that no request ever gets, as
            SGLang's MambaPool reserves slot 0 for padded batch entries.
        give_back: static only. Keep only the chunks the state pool's whole slots need
            and give the rest of the state share to the KV pool, as SGLang's
            configurator returns the unused part of the state budget (what is left is
            under one chunk).
        radix_cache_cap: static only. Run at most a third of the usable slots at once
            (at least one), the cap SGLang's scheduler applies with its radix cache on;
            an admission over the cap waits (returns None) without an OOM event.
    """

    name = "avmp"

    def __init__(
        self,
        geometry: ModelGeometry,
        config: MemoryConfig,
        backing: Backing | None = None,
        *,
        fixed_state_fraction: float | None = None,
        padding_slot: bool = False,
        give_back: bool = False,
        radix_cache_cap: bool = False,
    ) -> None:
        if fixed_state_fraction is not None and not 0.0 <= fixed_state_fraction <= 1.0:
            raise ValueError(f"fixed_state_fraction must be in [0, 1], got {fixed_state_fraction}")
        if fixed_state_fraction is None and (padding_slot or give_back or radix_cache_cap):
            raise ValueError(
                "padding_slot, give_back and radix_cache_cap shape a fixed split: "
                "they need fixed_state_fraction"
            )
        super().__init__(geometry, config)
        self.spec = CacheSpec.from_geometry(geometry, config.block_size)
        self.backing = backing
        self._reserve = ChunkReserve(config.num_chunks)
        self._kv = Pool(PoolKind.KV, self.spec.page_bytes, config.chunk_bytes)
        self._state = Pool(PoolKind.STATE, self.spec.slot_bytes, config.chunk_bytes)
        self._pools = {PoolKind.KV: self._kv, PoolKind.STATE: self._state}
        self._requests: dict[int, _Request] = {}
        self._freed = RecentFrees()
        self._num_live_tokens = 0
        self._num_adopted_pages = 0
        self._cached = CachedUnits()
        self._epoch = 0
        self._slots_per_request = 1 if self.spec.slot_bytes else 0
        self._block_size = config.block_size
        self._has_pages = self.spec.page_bytes > 0
        kv_chunks_alone = config.num_chunks - self._state.chunks_for(self._slots_per_request)
        self._max_pages_alone = self._pages_alone(
            self._kv.units_for(kv_chunks_alone), kv_chunks_alone >= 0
        )
        self._debug = os.environ.get("AVMP_DEBUG") == "1"
        self.events: list[MemoryEvent] = []
        self._history = MigrationHistory() if config.migration_policy == "streak" else None
        if backing is not None:
            backing.attach(self.spec, config)
        self.fixed_state_fraction = fixed_state_fraction
        self.padding_slot_id = -1  # the slot held back as SGLang's padding slot, if any
        self.max_running: int | None = None  # SGLang's running cap, if any
        if fixed_state_fraction is not None:
            self._split_once(fixed_state_fraction, give_back)
            self._hold_padding_slot(padding_slot)
            if radix_cache_cap and self._slots_per_request:
                self.max_running = max(1, self._state.num_free // 3)

    def _split_once(self, state_fraction: float, give_back: bool) -> None:
        """Hand every chunk to the pools at start-up; from then on `_make_room` finds
        nothing, as the reserve is empty and migration is off."""
        self.name = "static"
        num_state = round(self.config.num_chunks * state_fraction)
        if give_back and self._slots_per_request:
            num_state = self._state.chunks_for(self._state.units_for(num_state))
        if num_state:
            self._take_reserve(PoolKind.STATE, num_state)
        if self.config.num_chunks - num_state:
            self._take_reserve(PoolKind.KV, self.config.num_chunks - num_state)
        self.events.clear()  # the start-up split is not a run-time event
        has_slot = self._state.num_units >= self._slots_per_request
        self._max_pages_alone = self._pages_alone(self._kv.num_units, has_slot)

    def _hold_padding_slot(self, wanted: bool) -> None:
        """Take the state pool's first slot for good (no request's, never freed)."""
        if not (wanted and self._slots_per_request and self._state.num_free):
            return
        self.padding_slot_id = self._state.allocate_one()
        has_slot = self._state.num_free >= self._slots_per_request
        self._max_pages_alone = self._pages_alone(self._kv.num_units, has_slot)

    # -- the allocator interface ----------------------------------------------------

    def admit(
        self, request_id: int, num_tokens: int, cached: Sequence[int] = ()
    ) -> RequestUnits | None:
        if type(request_id) is not int:  # the checks are called only on misuse
            check_request_id(request_id)
        if type(num_tokens) is not int or num_tokens <= 0:
            check_num_tokens("num_tokens", num_tokens)
        if request_id in self._requests:
            raise DuplicateRequestError(f"request {request_id} is already live")
        if self.max_running is not None and len(self._requests) >= self.max_running:
            return None
        # -(-a // b) is ceil_div inlined: a call costs as much as the rest of a grow
        num_pages = -(-num_tokens // self._block_size) if self._has_pages else 0
        if num_pages > self._max_pages_alone:
            self._raise_too_large(num_tokens)
        num_slots = self._slots_per_request
        adopted = self._adoptable(cached, num_tokens) if cached else []
        num_fresh = num_pages - len(adopted)
        if (num_fresh > self._kv.num_free or num_slots > self._state.num_free) and not (
            self._make_room(num_fresh, num_slots)
        ):
            return None
        if adopted:  # read again: making room may have compacted the pages it adopts
            adopted = self._cached.kv_units(cached)
        pages = adopted + (self._kv.allocate(num_fresh) if num_fresh else [])
        slot = self._state.allocate_one() if num_slots else -1
        if adopted:
            self._cached.adopt(adopted)
            self._num_adopted_pages += len(adopted)
        self._requests[request_id] = _Request(slot, array("q", pages), num_tokens, len(adopted))
        self._freed.discard(request_id)
        self._num_live_tokens += num_tokens
        self.stats.num_admits += 1
        if self._debug:
            self.check_integrity()
        return RequestUnits(slot, tuple(pages))

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        if type(num_new_tokens) is not int or num_new_tokens <= 0:  # the call only on misuse
            check_num_tokens("num_new_tokens", num_new_tokens)
        # `_live` and `ceil_div` inlined: each call would add a third to a decode step
        if type(request_id) is not int:  # before the lookup: 1.0 == 1 would find request 1
            check_request_id(request_id)
        request = self._requests.get(request_id)
        if request is None:
            raise self._freed.not_live(request_id)
        num_tokens = request.num_tokens + num_new_tokens
        num_new_pages = 0
        if self._has_pages:
            num_held = len(request.pages)
            num_new_pages = -(-num_tokens // self._block_size) - num_held
            if num_new_pages and num_held + num_new_pages > self._max_pages_alone:
                self._raise_too_large(num_tokens)
        new_pages: list[int] = []
        if num_new_pages:  # most grows (decode steps) stay inside the last page
            if num_new_pages > self._kv.num_free and not self._make_room(num_new_pages, 0):
                return None
            new_pages = self._kv.allocate(num_new_pages)
            request.pages.extend(new_pages)
        request.num_tokens = num_tokens
        self._num_live_tokens += num_new_tokens
        self.stats.num_grows += 1
        if self._debug:
            self.check_integrity()
        return new_pages

    def free(self, request_id: int) -> None:
        self._free(request_id, keep_slot=False)

    def free_keeping_slot(self, request_id: int) -> int:
        if not self._slots_per_request:
            raise AllocatorError(f"{self.geometry.name} has no recurrent state to checkpoint")
        slot = self._free(request_id, keep_slot=True)
        return self._cached.hold_slot(slot)

    def _free(self, request_id: int, keep_slot: bool) -> int:
        """Free a request's units (its slot too unless ``keep_slot``); returns its slot."""
        if type(request_id) is not int:  # before the lookup: 1.0 == 1 would find request 1
            check_request_id(request_id)
        request = self._requests.pop(request_id, None)
        if request is None:
            raise self._freed.not_live(request_id, freeing=True)
        if request.pages:
            if self._cached.refs:  # pages the prefix cache or another request also holds
                freed = array("q", self._cached.freed_of(request.pages))
                self._num_adopted_pages -= request.num_adopted
                if freed:
                    self._kv.release(freed)
            else:
                self._kv.release(request.pages)
        if request.slot >= 0 and not keep_slot:
            self._state.release_one(request.slot)
        self._freed.add(request_id)
        self._num_live_tokens -= request.num_tokens
        self.stats.num_frees += 1
        if self._debug:
            self.check_integrity()
        return request.slot

    def units(self, request_id: int) -> RequestUnits:
        request = self._live(request_id)
        return RequestUnits(request.slot, tuple(request.pages))

    def cache_kv_unit(self, request_id: int, index: int) -> int:
        request = self._live(request_id)
        if type(index) is not int or not 0 <= index < request.num_tokens // self._block_size:
            raise AllocatorError(
                f"request {request_id} holds no full page {index!r} "
                f"({request.num_tokens} tokens)"
            )
        return self._cached.hold_kv(request.pages[index])

    def cache_checkpoint(self) -> int | None:
        if not self._slots_per_request:
            raise AllocatorError(f"{self.geometry.name} has no recurrent state to checkpoint")
        if not self._state.num_free and not self._make_room(0, 1):
            return None
        return self._cached.hold_slot(self._state.allocate_one())

    def release_cached(self, key: int) -> None:
        pool, unit, freed = self._cached.release(key)
        if freed:
            if pool is PoolKind.KV:
                self._kv.release(array("q", [unit]))
            else:
                self._state.release_one(unit)

    def cached_unit(self, key: int) -> int:
        return self._cached.lookup(key)[1]

    def cached_keys(self) -> list[int]:
        return self._cached.keys()

    def _adoptable(self, keys: Sequence[int], num_tokens: int) -> list[int]:
        """The pages behind ``keys``, checked to be full pages of a ``num_tokens`` prefix."""
        if len(keys) * self._block_size > num_tokens:
            raise AllocatorError(
                f"{len(keys)} cached pages hold more than the request's {num_tokens} tokens"
            )
        return self._cached.kv_units(keys)

    def num_tokens(self, request_id: int) -> int:
        return self._live(request_id).num_tokens

    def fits_alone(self, num_tokens: int) -> bool:
        num_pages = ceil_div(num_tokens, self._block_size) if self._has_pages else 0
        return num_pages <= self._max_pages_alone

    def could_hold(self, num_requests: int, num_kv_units: int) -> bool:
        if self.max_running is not None and num_requests > self.max_running:
            return False
        num_slots = num_requests * self._slots_per_request
        if self.fixed_state_fraction is not None:  # each pool keeps its start-up share
            held = 1 if self.padding_slot_id >= 0 else 0
            return num_slots + held <= self._state.num_units and num_kv_units <= self._kv.num_units
        kv_chunks = self._kv.chunks_for(num_kv_units) if self._has_pages else 0
        return self._state.chunks_for(num_slots) + kv_chunks <= self.config.num_chunks

    def usage(self) -> MemoryUsage:
        chunk_bytes = self.config.chunk_bytes
        return MemoryUsage(
            budget_bytes=self.config.budget_bytes,
            kv_capacity_bytes=len(self._kv.chunks) * chunk_bytes,
            state_capacity_bytes=len(self._state.chunks) * chunk_bytes,
            kv_used_bytes=self._kv.num_used * self.spec.page_bytes,
            state_used_bytes=self._state.num_used * self.spec.slot_bytes,
            kv_needed_bytes=(self._num_live_tokens - self._num_adopted_pages * self._block_size)
            * self.spec.kv_bytes_per_token,
            state_needed_bytes=len(self._requests) * self._slots_per_request * self.spec.slot_bytes,
            num_requests=len(self._requests),
            num_pages_used=self._kv.num_used,
            num_slots_used=self._state.num_used,
            kv_cached_bytes=self._cached.num_cache_only(PoolKind.KV) * self.spec.page_bytes,
            state_cached_bytes=self._cached.num_cache_only(PoolKind.STATE) * self.spec.slot_bytes,
        )

    @property
    def placement_epoch(self) -> int:
        return self._epoch

    @property
    def request_ids(self) -> list[int]:
        return list(self._requests)

    # -- what reports and GPU code read ---------------------------------------------

    def pool_chunks(self, pool: PoolKind) -> list[int]:
        """The physical chunks ``pool`` owns, in address order."""
        return list(self._pools[pool].chunks)

    def reserve_chunks(self) -> list[int]:
        """Chunks no pool owns yet, lowest first."""
        return self._reserve.chunk_ids

    def num_units(self, pool: PoolKind) -> int:
        """Units ``pool``'s chunks hold now."""
        return self._pools[pool].num_units

    def num_free_units(self, pool: PoolKind) -> int:
        """Units of ``pool`` handed out to nobody."""
        return self._pools[pool].num_free

    # -- invariants -----------------------------------------------------------------

    def check_integrity(self) -> None:
        owned = self._reserve.chunk_ids + self._kv.chunks + self._state.chunks
        assert sorted(owned) == list(range(self.config.num_chunks)), "chunks not conserved"
        live_slots: list[int] = [self.padding_slot_id] if self.padding_slot_id >= 0 else []
        live_slots += self._cached.held(PoolKind.STATE)
        num_tokens = num_adopted = 0
        for request_id, request in self._requests.items():
            assert request_id not in self._freed, f"request {request_id} live and freed"
            expected = ceil_div(request.num_tokens, self._block_size) if self._has_pages else 0
            assert len(request.pages) == expected, f"request {request_id}: page count"
            assert request.num_adopted * self._block_size <= request.num_tokens
            num_adopted += request.num_adopted
            if self._slots_per_request:
                live_slots.append(request.slot)
            else:
                assert request.slot == -1, f"request {request_id}: slot without state"
            num_tokens += request.num_tokens
        assert num_tokens == self._num_live_tokens, "live token count"
        assert num_adopted == self._num_adopted_pages, "adopted page count"
        live_pages = self._cached.check(r.pages for r in self._requests.values())
        self._kv.check_integrity(live_pages)
        self._state.check_integrity(live_slots)

    # -- finding room ---------------------------------------------------------------

    def _live(self, request_id: int) -> _Request:
        if type(request_id) is not int:  # before the lookup: 1.0 == 1 would find request 1
            check_request_id(request_id)
        request = self._requests.get(request_id)
        if request is None:
            raise self._freed.not_live(request_id)
        return request

    def _pages_alone(self, kv_units: int, slot_fits: bool) -> int:
        """The most pages one request may hold in an otherwise empty memory whose KV pool
        could hold ``kv_units`` pages, or -1 when its slot cannot fit at all."""
        if not slot_fits:
            return -1
        return kv_units if self._has_pages else 0

    def _raise_too_large(self, num_tokens: int) -> NoReturn:
        raise RequestTooLargeError(
            f"a request of {num_tokens} tokens needs more than all "
            f"{self.config.num_chunks} chunks of {self.config.chunk_bytes} bytes"
        )

    def _make_room(self, num_pages: int, num_slots: int) -> bool:
        """Give the pools room for ``num_pages`` pages and ``num_slots`` slots, or
        change nothing and count an OOM event (always, under a fixed split)."""
        plan = None
        if self.fixed_state_fraction is None:
            now = self._num_calls()
            plan = plan_room(self._kv, self._state, num_pages, num_slots,
                             len(self._reserve), self.config.migration_batch_chunks,
                             self._extra_chunks(now))
        if plan is None:
            self.stats.num_oom_events += 1
            if self._debug:
                self.check_integrity()
            return False
        self._execute(plan)
        if plan.migration is not None and self._history is not None:
            self._history.record(plan.migration.recipient, plan.migration.num_chunks, now)
        return True

    def _num_calls(self) -> int:
        """Allocator calls completed so far: the clock of the migration history (counted
        in calls, not seconds, so that the same calls give the same decisions)."""
        s = self.stats
        return s.num_admits + s.num_grows + s.num_frees + s.num_oom_events

    def _extra_chunks(self, now: int) -> tuple[int, int]:
        """What a migration into KV, and into state, may move beyond the demand."""
        if self._history is None:
            return (0, 0)
        return (self._history.extra_chunks(PoolKind.KV, now),
                self._history.extra_chunks(PoolKind.STATE, now))

    def _execute(self, plan: RoomPlan) -> None:
        if plan.reserve_state:
            self._take_reserve(PoolKind.STATE, plan.reserve_state)
        if plan.reserve_kv:
            self._take_reserve(PoolKind.KV, plan.reserve_kv)
        if plan.migration is not None:
            if plan.migration.moves:
                self._compact(plan.migration.donor, plan.migration.moves)
            self._migrate(plan.migration)

    def _take_reserve(self, kind: PoolKind, num_chunks: int) -> None:
        chunk_ids = self._reserve.take(num_chunks)
        if self.backing is not None:
            try:
                self.backing.map_chunks(kind, chunk_ids)
            except BaseException:
                self._reserve.give_back(chunk_ids)
                raise
        self._pools[kind].add_chunks(chunk_ids)
        num_bytes = num_chunks * self.config.chunk_bytes
        self.events.append(MemoryEvent("reserve", kind, num_chunks, 0, num_bytes))

    def _compact(self, kind: PoolKind, moves: list[tuple[int, int]]) -> None:
        """Copy live tail units down and point their handles at the copies."""
        if self.backing is not None:
            self.backing.copy_units(kind, moves)
        destination = dict(moves)
        if kind is PoolKind.KV:
            for request in self._requests.values():
                pages = request.pages
                for i, page in enumerate(pages):
                    if page in destination:
                        pages[i] = destination[page]
        else:
            for request in self._requests.values():
                request.slot = destination.get(request.slot, request.slot)
        if self._cached.units or self._cached.refs:
            self._cached.remap(kind, destination)
        self._pools[kind].apply_moves(moves)
        self._epoch += 1
        num_bytes = len(moves) * self._pools[kind].unit_bytes
        self.stats.num_compactions += 1
        self.stats.num_units_moved += len(moves)
        self.stats.num_bytes_compacted += num_bytes
        self.events.append(MemoryEvent("compaction", kind, 0, len(moves), num_bytes))

    def _migrate(self, migration: Migration) -> None:
        donor = self._pools[migration.donor]
        recipient = self._pools[migration.recipient]
        expected = donor.chunks[len(donor.chunks) - migration.num_chunks:]
        # The donor's last chunk borders the recipient's tail (in one buffer the pools
        # grow toward each other), so it becomes the recipient's first new chunk: a
        # one-buffer backing then moves the boundary without copying a byte.
        handed_over = expected[::-1]
        if self.backing is not None:
            unmapped = self.backing.unmap_chunks(donor.kind, migration.num_chunks)
            assert unmapped == expected, f"backing unmapped {unmapped}, expected {expected}"
            try:
                self.backing.map_chunks(recipient.kind, handed_over)
            except BaseException:
                self.backing.map_chunks(donor.kind, expected)  # undo: the donor keeps them
                raise
        donor.remove_tail_chunks(migration.num_chunks)
        recipient.add_chunks(handed_over)
        self.stats.num_migrations += 1
        self.stats.num_chunks_migrated += migration.num_chunks
        self.stats.chunks_migrated_to[recipient.kind.value] += migration.num_chunks
        num_bytes = migration.num_chunks * self.config.chunk_bytes
        self.events.append(
            MemoryEvent("migration", recipient.kind, migration.num_chunks, 0, num_bytes)
        )
