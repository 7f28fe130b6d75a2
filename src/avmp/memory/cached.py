"""Units the prefix cache holds: KV units shared read-only between requests and the
cache, and checkpoint slots that only the cache holds. Every layout keeps one
`CachedUnits` beside its request table, so that sharing works the same way in each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from avmp.memory.spec import AllocatorError, PoolKind


class CachedUnits:
    """The prefix cache's holdings, by key, and the holder count of every shared KV unit.

    A key is minted per holding and never reused, so it stays valid while the unit
    behind it moves (compaction rewrites ``units``, never the key). ``refs`` maps a KV
    unit that the cache holds to its number of holders (live requests whose page list
    names it, plus cache keys on it); a unit not in ``refs`` has exactly one holder, its
    request, so a layout without prefix caching pays one empty-dict test per free.
    A checkpoint slot has one holder, its key, and is never in ``refs``.

    How many units only the cache holds (`num_cache_only`, read at every step by the
    layouts' usage) is kept up to date as holders come and go, not counted over the
    holdings: a KV unit is the cache's alone when its holders are all cache keys.
    """

    __slots__ = ("units", "refs", "_next_key", "_keys_on", "_num_slots", "_num_kv_only",
                 "_keys_of")

    def __init__(self) -> None:
        self.units: dict[int, tuple[PoolKind, int]] = {}
        self.refs: dict[int, int] = {}
        self._next_key = 0
        self._keys_on: dict[int, int] = {}  # KV unit -> cache keys on it
        self._num_slots = 0  # checkpoint slots held
        self._num_kv_only = 0  # KV units whose every holder is a cache key
        self._keys_of: dict[tuple[PoolKind, int], list[int]] = {}  # unit -> keys on it

    def _only(self, unit: int) -> bool:
        count = self.refs.get(unit)
        return count is not None and count == self._keys_on.get(unit, 0)

    def __len__(self) -> int:
        return len(self.units)

    def _mint(self, pool: PoolKind, unit: int) -> int:
        key = self._next_key
        self._next_key += 1
        self.units[key] = (pool, unit)
        self._keys_of.setdefault((pool, unit), []).append(key)
        return key

    def hold_kv(self, unit: int) -> int:
        """A new key on a KV unit that a live request holds (one more holder)."""
        was = self._only(unit)
        self.refs[unit] = self.refs.get(unit, 1) + 1
        self._keys_on[unit] = self._keys_on.get(unit, 0) + 1
        self._num_kv_only += self._only(unit) - was
        return self._mint(PoolKind.KV, unit)

    def hold_slot(self, slot: int) -> int:
        """A new key on a checkpoint slot that was just allocated for the cache."""
        self._num_slots += 1
        return self._mint(PoolKind.STATE, slot)

    def kv_units(self, keys: Sequence[int]) -> list[int]:
        """The KV units behind ``keys``, for a request that adopts them.

        Raises:
            AllocatorError: a key the cache does not hold, or one on a checkpoint.
        """
        units = []
        for key in keys:
            pool, unit = self.lookup(key)
            if pool is not PoolKind.KV:
                raise AllocatorError(f"cache key {key} holds a checkpoint, not a KV unit")
            units.append(unit)
        return units

    def adopt(self, units: Iterable[int]) -> None:
        """One more holder (the adopting request) on each unit."""
        refs = self.refs
        for unit in units:
            was = self._only(unit)
            refs[unit] += 1
            self._num_kv_only -= was  # a request holds it now

    def lookup(self, key: int) -> tuple[PoolKind, int]:
        if type(key) is not int:
            raise TypeError(f"cache key must be an int, got {key!r} ({type(key).__name__})")
        held = self.units.get(key)
        if held is None:
            raise AllocatorError(f"cache key {key} is not held")
        return held

    def release(self, key: int) -> tuple[PoolKind, int, bool]:
        """Drop a key: its pool, its unit, and whether that unit is now free."""
        pool, unit = self.lookup(key)
        del self.units[key]
        on_unit = self._keys_of[pool, unit]
        on_unit.remove(key)
        if not on_unit:
            del self._keys_of[pool, unit]
        if pool is PoolKind.STATE:
            self._num_slots -= 1
            return pool, unit, True
        was = self._only(unit)
        keys = self._keys_on[unit] - 1
        if keys:
            self._keys_on[unit] = keys
        else:
            del self._keys_on[unit]
        free = self._drop(unit)
        self._num_kv_only += self._only(unit) - was
        return pool, unit, free

    def drop_holder(self, unit: int) -> bool:
        """One holder less on a KV unit; returns whether nobody holds it any more."""
        if unit not in self.refs:
            return True
        was = self._only(unit)
        free = self._drop(unit)
        self._num_kv_only += self._only(unit) - was
        return free

    def _drop(self, unit: int) -> bool:
        count = self.refs.get(unit)
        if count is None:
            return True
        if count == 1:
            del self.refs[unit]
            return True
        self.refs[unit] = count - 1
        return False

    def freed_of(self, units: Iterable[int]) -> list[int]:
        """Of a freed request's KV units, those that nobody else holds."""
        return [unit for unit in units if self.drop_holder(unit)]

    def remap(self, pool: PoolKind, destination: dict[int, int]) -> None:
        """Compaction moved units of ``pool``: point keys and holder counts at the copies
        (the moved units' alone: every source is read before any copy is written, as a
        unit may be both)."""
        keys_of = self._keys_of
        moved_keys = [(dst, keys_of.pop((pool, src)))
                      for src, dst in destination.items() if (pool, src) in keys_of]  # fmt: skip
        for dst, keys in moved_keys:
            self._keys_of[pool, dst] = keys
            for key in keys:
                self.units[key] = (pool, dst)
        if pool is not PoolKind.KV:
            return
        for table in (self.refs, self._keys_on):
            moved = [(dst, table.pop(src)) for src, dst in destination.items() if src in table]
            for dst, count in moved:
                table[dst] = count

    def held(self, pool: PoolKind) -> list[int]:
        """Units of ``pool`` behind the cache's keys (a KV unit once per key)."""
        return [unit for held_pool, unit in self.units.values() if held_pool is pool]

    def keys(self) -> list[int]:
        return list(self.units)

    def num_cache_only(self, pool: PoolKind) -> int:
        """Units of ``pool`` that only the cache holds: what evicting it all would free."""
        return self._num_slots if pool is PoolKind.STATE else self._num_kv_only

    def check(self, request_units: Iterable[Sequence[int]]) -> list[int]:
        """Assert that the holder counts match the requests' KV units and the keys, and
        return every KV unit in use once (requests' and cache-only ones)."""
        holders: dict[int, int] = {}
        for units in request_units:
            for unit in units:
                holders[unit] = holders.get(unit, 0) + 1
        for unit in self.held(PoolKind.KV):
            holders[unit] = holders.get(unit, 0) + 1
        for unit, count in holders.items():
            assert self.refs.get(unit, 1) == count, f"KV unit {unit}: {count} holders"
        assert set(self.refs) <= set(holders), "a holder count on a unit nobody holds"
        slots = self.held(PoolKind.STATE)
        assert len(slots) == len(set(slots)), "a checkpoint slot held twice"
        keys_on: dict[int, int] = {}
        for unit in self.held(PoolKind.KV):
            keys_on[unit] = keys_on.get(unit, 0) + 1
        assert keys_on == self._keys_on, "cache keys per KV unit out of date"
        keys_of: dict[tuple[PoolKind, int], list[int]] = {}
        for key, held in self.units.items():
            keys_of.setdefault(held, []).append(key)
        mine = {unit: sorted(keys) for unit, keys in self._keys_of.items()}
        assert {u: sorted(k) for u, k in keys_of.items()} == mine, "keys per unit out of date"
        only = sum(1 for unit, n in keys_on.items() if self.refs.get(unit) == n)
        assert (self._num_kv_only, self._num_slots) == (only, len(slots)), "cache-only counts"
        return list(holders)
