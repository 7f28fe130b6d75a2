"""The oracle layout: the reference no real system can beat. Bookkeeping only."""

from __future__ import annotations

from collections.abc import Sequence

from avmp.memory.cached import CachedUnits
from avmp.memory.requests import (
    LiveRequest,
    RequestTable,
    check_num_tokens,
    check_request_id,
)
from avmp.memory.spec import (
    NO_SLOT,
    AllocatorError,
    CacheSpec,
    MemoryConfig,
    MemoryUsage,
    PoolKind,
    RequestUnits,
)
from avmp.models.geometry import ModelGeometry
from avmp.units import ceil_div


class _Held(LiveRequest):
    """A live request of the oracle and how many of its leading pages it adopted from
    the prefix cache."""

    __slots__ = ("num_adopted",)

    def __init__(self, num_tokens: int, slot: int, pages: list[int], num_adopted: int) -> None:
        super().__init__(num_tokens, slot, [], pages)
        self.num_adopted = num_adopted


class OracleAllocator(RequestTable[_Held]):
    """Exact bytes with free, instant migration: a request is admitted (or grown) while
    the exact bytes in use (whole slots plus pages of ``config.block_size`` tokens, no
    chunk rounding) fit the budget. No layout can hold more; it is the reference.

    Unit ids are recycled lowest-freed-last (a stack) and new ids are minted in order;
    they only exist so that the interface can name units.
    """

    name = "oracle"

    def __init__(self, geometry: ModelGeometry, config: MemoryConfig) -> None:
        super().__init__(geometry, config)
        self.spec = CacheSpec.from_geometry(geometry, config.block_size)
        self._page_bytes = self.spec.page_bytes
        self._slot_bytes = self.spec.slot_bytes
        self._tokens_per_page = config.block_size if self._page_bytes else 0
        self._budget = config.budget_bytes
        self._used_bytes = 0
        self._free_pages: list[int] = []
        self._free_slots: list[int] = []
        self._num_page_ids = 0
        self._num_slot_ids = 0
        self._cached = CachedUnits()

    def _pages_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self._tokens_per_page) if self._tokens_per_page else 0

    def fits_alone(self, num_tokens: int) -> bool:
        return self._slot_bytes + self._pages_for(num_tokens) * self._page_bytes <= self._budget

    def could_hold(self, num_requests: int, num_kv_units: int) -> bool:
        needed = num_requests * self._slot_bytes + num_kv_units * self._page_bytes
        return needed <= self._budget

    def _take_pages(self, num_pages: int) -> list[int]:
        free = self._free_pages
        reused = min(num_pages, len(free))
        pages = free[-reused:][::-1] if reused else []
        if reused:
            del free[-reused:]
        if num_pages > reused:
            start = self._num_page_ids
            self._num_page_ids = start + num_pages - reused
            pages += range(start, self._num_page_ids)
        return pages

    def admit(
        self, request_id: int, num_tokens: int, cached: Sequence[int] = ()
    ) -> RequestUnits | None:
        self._check_new(request_id, num_tokens)
        num_pages = self._pages_for(num_tokens)
        adopted: list[int] = []
        if cached:
            if len(cached) * self._tokens_per_page > num_tokens or not self._tokens_per_page:
                raise AllocatorError(
                    f"{len(cached)} cached pages hold more than the request's {num_tokens} tokens"
                )
            adopted = self._cached.kv_units(cached)
            num_pages -= len(adopted)
        need = self._slot_bytes + num_pages * self._page_bytes
        if self._used_bytes + need > self._budget:
            self.stats.num_oom_events += 1
            return None
        self._used_bytes += need
        slot = self._take_slot() if self._slot_bytes else NO_SLOT
        pages = self._take_pages(num_pages)
        if adopted:
            self._cached.adopt(adopted)
            pages = adopted + pages
        self._admitted(request_id, _Held(num_tokens, slot, pages, len(adopted)))
        return RequestUnits(slot, tuple(pages))

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        slot, self._num_slot_ids = self._num_slot_ids, self._num_slot_ids + 1
        return slot

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        if type(num_new_tokens) is not int or num_new_tokens <= 0:  # the call only on misuse
            check_num_tokens("num_new_tokens", num_new_tokens)
        # `_get` and `_pages_for` inlined: each call would add a fifth to a decode step
        if type(request_id) is not int:  # before the lookup: 1.0 == 1 would find request 1
            check_request_id(request_id)
        request = self._live.get(request_id)
        if request is None:
            raise self._freed.not_live(request_id)
        new = request.num_tokens + num_new_tokens
        tokens_per_page = self._tokens_per_page
        num_pages = (-(-new // tokens_per_page) if tokens_per_page else 0) - len(request.pages)
        added: list[int] = []
        if num_pages:
            self._check_grow(request_id, new)
            taken = self._take_bytes_for_pages(num_pages)
            if taken is None:
                self.stats.num_oom_events += 1
                return None
            added = taken
            request.pages += added
        request.num_tokens = new
        self.stats.num_grows += 1
        return added

    def _take_bytes_for_pages(self, num_pages: int) -> list[int] | None:
        """Take ``num_pages`` pages for a grow, or None (nothing taken) if short."""
        need = num_pages * self._page_bytes
        if self._used_bytes + need > self._budget:
            return None
        self._used_bytes += need
        return self._take_pages(num_pages)

    def free(self, request_id: int) -> None:
        request = self._pop_live(request_id)
        self._release_pages(request)
        if request.slot != NO_SLOT:
            self._used_bytes -= self._slot_bytes
            self._free_slots.append(request.slot)

    def free_keeping_slot(self, request_id: int) -> int:
        if not self._slot_bytes:
            raise AllocatorError(f"{self.geometry.name} has no recurrent state to checkpoint")
        request = self._pop_live(request_id)
        self._release_pages(request)
        return self._cached.hold_slot(request.slot)  # its bytes stay in use, the cache's now

    def _release_pages(self, request: _Held) -> None:
        pages = self._cached.freed_of(request.pages) if self._cached.refs else request.pages
        self._used_bytes -= len(pages) * self._page_bytes
        self._free_pages += pages

    def units(self, request_id: int) -> RequestUnits:
        request = self._get(request_id)
        return RequestUnits(request.slot, tuple(request.pages))

    def cache_kv_unit(self, request_id: int, index: int) -> int:
        request = self._get(request_id)
        full = request.num_tokens // self._tokens_per_page if self._tokens_per_page else 0
        if type(index) is not int or not 0 <= index < full:
            raise AllocatorError(
                f"request {request_id} holds no full page {index!r} ({request.num_tokens} tokens)"
            )
        return self._cached.hold_kv(request.pages[index])

    def cache_checkpoint(self) -> int | None:
        if not self._slot_bytes:
            raise AllocatorError(f"{self.geometry.name} has no recurrent state to checkpoint")
        if self._used_bytes + self._slot_bytes > self._budget:
            self.stats.num_oom_events += 1
            return None
        self._used_bytes += self._slot_bytes
        return self._cached.hold_slot(self._take_slot())

    def release_cached(self, key: int) -> None:
        pool, unit, freed = self._cached.release(key)
        if pool is PoolKind.STATE:
            self._used_bytes -= self._slot_bytes
            self._free_slots.append(unit)
        elif freed:
            self._used_bytes -= self._page_bytes
            self._free_pages.append(unit)

    def cached_unit(self, key: int) -> int:
        return self._cached.lookup(key)[1]

    def cached_keys(self) -> list[int]:
        return self._cached.keys()

    def usage(self) -> MemoryUsage:
        """Capacity follows use exactly: each pool's capacity is what it uses, and the
        free bytes stay unassigned, ready for either pool."""
        num_pages = sum(len(r.pages) for r in self._live.values())
        if self._cached.refs or self._cached.units:  # shared pages count once
            num_pages = len(self._cached.check(r.pages for r in self._live.values()))
        num_slots = sum(r.slot != NO_SLOT for r in self._live.values())
        num_checkpoints = len(self._cached.held(PoolKind.STATE))
        per_page = self._tokens_per_page
        tokens = sum(r.num_tokens - r.num_adopted * per_page for r in self._live.values())
        kv_used = num_pages * self._page_bytes
        state_used = (num_slots + num_checkpoints) * self._slot_bytes
        return MemoryUsage(
            budget_bytes=self._budget,
            kv_capacity_bytes=kv_used,
            state_capacity_bytes=state_used,
            kv_used_bytes=kv_used,
            state_used_bytes=state_used,
            kv_needed_bytes=tokens * self.geometry.kv_bytes_per_token,
            state_needed_bytes=num_slots * self._slot_bytes,
            num_requests=len(self._live),
            num_pages_used=num_pages,
            num_slots_used=num_slots,
            kv_cached_bytes=self._cached.num_cache_only(PoolKind.KV) * self._page_bytes,
            state_cached_bytes=num_checkpoints * self._slot_bytes,
        )

    def check_integrity(self) -> None:
        assert not any(r in self._freed for r in self._live), "a live request is marked freed"
        pages = self._cached.check(r.pages for r in self._live.values())
        _check_stack(self._free_pages, pages, self._num_page_ids)
        slots = [r.slot for r in self._live.values() if r.slot != NO_SLOT]
        slots += self._cached.held(PoolKind.STATE)
        _check_stack(self._free_slots, slots, self._num_slot_ids)
        used = len(pages) * self._page_bytes + len(slots) * self._slot_bytes
        assert used == self._used_bytes, "byte count drifted"
        assert used <= self._budget, "more bytes in use than the budget"
        for request in self._live.values():
            want = self._pages_for(request.num_tokens)
            assert len(request.pages) == want, "pages do not match the request's tokens"
            assert request.num_adopted * self._tokens_per_page <= request.num_tokens


def _check_stack(free: list[int], owned: list[int], num_units: int) -> None:
    """Free and owned unit ids partition ``range(num_units)``."""
    assert len(owned) == len(set(owned)), "a unit is owned twice"
    assert len(free) == len(set(free)), "a unit is free twice"
    assert not set(owned) & set(free), "a unit is both free and owned"
    assert len(owned) + len(free) == num_units, "units are not conserved"
    assert all(0 <= u < num_units for u in free), "a free unit is out of range"
