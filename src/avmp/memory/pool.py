"""One pool of equal units (KV pages or state slots) over the chunks it owns."""

from __future__ import annotations

from array import array

import numpy as np

from avmp.memory.address_space import chunks_for_units, units_for_chunks
from avmp.memory.spec import PoolKind

_FREE = 1
_USED = 0
_UINT8 = np.dtype(np.uint8)  # dtype objects made once: a lookup per flush costs
_INT64 = np.dtype(np.int64)


class Pool:
    """The units of one pool and which of them are free, handed out lowest first.

    Why a byte map and not a heap: ``bytearray.find`` scans for the lowest free unit at C
    speed, a run of free units is taken with one slice assignment, and freeing is one
    byte store per unit. Handing out the lowest free unit keeps the pool's tail free, so
    a tail chunk can usually migrate without compaction.

    Invariants (after `flush`): ``len(free_map) == units_for_chunks(len(chunks))``;
    ``free_map[i]`` is 1 iff unit ``i`` is free; ``num_free`` counts the ones; no unit
    below ``low`` is free. Released units wait in ``_pending`` until the next method
    that reads the map or ``low`` flushes them; ``num_free`` already counts them.
    """

    __slots__ = (
        "kind", "unit_bytes", "chunk_bytes", "chunks", "free_map", "num_free", "low", "_pending"
    )

    def __init__(self, kind: PoolKind, unit_bytes: int, chunk_bytes: int) -> None:
        self.kind = kind
        self.unit_bytes = unit_bytes
        self.chunk_bytes = chunk_bytes
        self.chunks: list[int] = []  # owned physical chunk ids, in address order
        self.free_map = bytearray()
        self._pending: list[array[int]] = []  # released, not yet written
        self.num_free = 0
        self.low = 0

    @property
    def num_units(self) -> int:
        return len(self.free_map)

    @property
    def num_used(self) -> int:
        return len(self.free_map) - self.num_free

    def units_for(self, num_chunks: int) -> int:
        """Units that ``num_chunks`` chunks of this pool hold."""
        return units_for_chunks(num_chunks, self.unit_bytes, self.chunk_bytes)

    def chunks_for(self, num_units: int) -> int:
        """The fewest chunks that hold ``num_units`` units of this pool."""
        return chunks_for_units(num_units, self.unit_bytes, self.chunk_bytes)

    # -- hot path -------------------------------------------------------------------

    def allocate(self, num_units: int) -> list[int]:
        """Take the ``num_units`` lowest free units (the caller checked ``num_free``)."""
        if self._pending:
            self.flush()
        if num_units == 1:  # a decode step's new page: the common case, kept short
            return [self.allocate_one()]
        free_map = self.free_map
        taken: list[int] = []
        start = self.low
        remaining = num_units
        while remaining:  # one run of free units per turn
            start = free_map.find(_FREE, start)
            stop = free_map.find(_USED, start, start + remaining)  # no further than needed
            if stop < 0:
                stop = start + remaining
            if stop - start == 1:  # a lone unit: an item store costs a tenth of a slice store
                free_map[start] = _USED
                taken.append(start)
            else:
                free_map[start:stop] = bytes(stop - start)
                taken.extend(range(start, stop))
            remaining -= stop - start
            start = stop
        self.low = start
        self.num_free -= num_units
        return taken

    def allocate_one(self) -> int:
        """Take the lowest free unit (the caller checked ``num_free``)."""
        if self._pending:
            self.flush()
        unit = self.free_map.find(_FREE, self.low)
        self.free_map[unit] = _USED
        self.low = unit + 1
        self.num_free -= 1
        return unit

    def release(self, units: array[int]) -> None:
        """Mark live units free again; ``units`` (an ``array('q')``) must not change
        afterwards.

        They count as free at once (``num_free``) but their bytes in the free map, and
        the low mark, are written by `flush` before anything reads them: one numpy
        scatter for every request freed since the last allocation, instead of a Python
        store per unit on cache-cold integers.
        """
        self._pending.append(units)
        self.num_free += len(units)

    def release_one(self, unit: int) -> None:
        """Mark one live unit free again, written at once: a request's slot is one unit,
        and a store and a compare cost less than queueing it for `flush`."""
        self.free_map[unit] = _FREE
        if unit < self.low:
            self.low = unit
        self.num_free += 1

    def flush(self) -> None:
        """Write the units queued by `release` into the free map and the low mark."""
        pending = self._pending
        if not pending:
            return
        if len(pending) == 1 and len(pending[0]) == 1:
            # one slot freed: a store and a compare cost less than numpy's call overhead
            unit = pending[0][0]
            self.free_map[unit] = _FREE
            if unit < self.low:
                self.low = unit
        else:
            packed = pending[0] if len(pending) == 1 else b"".join(pending)
            # a view held only here: a bytearray with a live export cannot be resized
            view = np.frombuffer(self.free_map, _UINT8)
            view[np.frombuffer(packed, _INT64)] = _FREE
            del view
            # the lowest newly freed unit, if below the mark, is the lowest free one
            # below it: a C scan of the map's head is cheaper than numpy's min
            lowest = self.free_map.find(_FREE, 0, self.low)
            if lowest >= 0:
                self.low = lowest
        pending.clear()

    # -- capacity -------------------------------------------------------------------

    def chunks_short(self, num_units: int) -> int:
        """Chunks this pool lacks to hand out ``num_units`` more units (0 if none)."""
        if num_units <= self.num_free:
            return 0
        # `chunks_for` and `num_used` inlined (four calls deep): every allocation that
        # finds its pool short asks both pools
        needed_bytes = (len(self.free_map) - self.num_free + num_units) * self.unit_bytes
        return -(-needed_bytes // self.chunk_bytes) - len(self.chunks)

    def max_donatable(self, num_pending: int) -> int:
        """Tail chunks this pool could give away (after compaction) and still hold its
        live units plus ``num_pending`` more."""
        return len(self.chunks) - self.chunks_for(self.num_used + num_pending)

    def free_tail_chunks(self) -> int:
        """Tail chunks that hold no live unit, so they can leave without compaction."""
        self.flush()
        highest_used = self.free_map.rfind(_USED)
        return len(self.chunks) - self.chunks_for(highest_used + 1)

    def add_chunks(self, chunk_ids: list[int]) -> None:
        """Append chunks at the tail; the units they complete become free."""
        if self._pending:
            self.flush()
        chunks = self.chunks
        chunks.extend(chunk_ids)
        # `units_for` and `_resize` inlined: a pool that grows takes chunks on most
        # admissions while the reserve lasts
        num_units = len(chunks) * self.chunk_bytes // self.unit_bytes if self.unit_bytes else 0
        added = num_units - len(self.free_map)
        self.free_map.extend(b"\x01" * added)
        self.num_free += added

    def remove_tail_chunks(self, num_chunks: int) -> list[int]:
        """Drop the last ``num_chunks`` chunks, whose units must all be free.

        Returns:
            Their ids, tail last.
        """
        self.flush()
        keep = len(self.chunks) - num_chunks
        new_num_units = self.units_for(keep)
        dropped_units = self.free_map[new_num_units:]
        if dropped_units.count(_FREE) != len(dropped_units):
            raise AssertionError(f"{self.kind.value} pool: tail chunks still hold live units")
        self._resize(new_num_units)
        self.num_free -= len(dropped_units)
        self.low = min(self.low, new_num_units)
        removed = self.chunks[keep:]
        del self.chunks[keep:]
        return removed

    def _resize(self, num_units: int) -> None:
        """Cut the free map to ``num_units`` or extend it with free units."""
        if num_units < len(self.free_map):
            del self.free_map[num_units:]
        else:
            self.free_map.extend(b"\x01" * (num_units - len(self.free_map)))

    # -- compaction -----------------------------------------------------------------

    def plan_compaction(self, keep_chunks: int) -> list[tuple[int, int]]:
        """Moves that empty every unit beyond the first ``keep_chunks`` chunks.

        Returns:
            ``(src, dst)`` pairs: live units of the dropped tail, in ascending order,
            each sent to the lowest free unit that stays. Sources and destinations are
            disjoint. The caller checked that enough free units stay.
        """
        self.flush()
        free_map = self.free_map
        boundary = self.units_for(keep_chunks)
        moves: list[tuple[int, int]] = []
        src = free_map.find(_USED, boundary)
        dst = self.low
        while src >= 0:
            dst = free_map.find(_FREE, dst)
            if dst < 0 or dst >= boundary:
                raise AssertionError(f"{self.kind.value} pool: no free unit left for {src}")
            moves.append((src, dst))
            dst += 1
            src = free_map.find(_USED, src + 1)
        return moves

    def apply_moves(self, moves: list[tuple[int, int]]) -> None:
        """Record that each source unit's contents now live at its destination."""
        self.flush()
        free_map = self.free_map
        for src, dst in moves:
            free_map[src] = _FREE
            free_map[dst] = _USED
        if moves:
            self.low = free_map.find(_FREE)
            if self.low < 0:
                self.low = len(free_map)

    # -- invariants -----------------------------------------------------------------

    def check_integrity(self, live_units: list[int]) -> None:
        """Raise AssertionError unless the free map matches ``live_units`` exactly."""
        self.flush()
        name = self.kind.value
        assert len(self.free_map) == self.units_for(len(self.chunks)), f"{name}: unit count"
        assert len(set(self.chunks)) == len(self.chunks), f"{name}: chunk listed twice"
        assert self.free_map.count(_FREE) == self.num_free, f"{name}: free count"
        assert self.free_map.count(_FREE) + self.free_map.count(_USED) == len(self.free_map)
        lowest_free = self.free_map.find(_FREE)
        assert lowest_free < 0 or lowest_free >= self.low, f"{name}: free unit below low mark"
        assert len(set(live_units)) == len(live_units), f"{name}: a unit is owned twice"
        assert len(live_units) == self.num_used, f"{name}: live units vs used count"
        for unit in live_units:
            assert 0 <= unit < len(self.free_map), f"{name}: unit {unit} out of range"
            assert self.free_map[unit] == _USED, f"{name}: live unit {unit} marked free"
        assert self.num_used * self.unit_bytes <= len(self.chunks) * self.chunk_bytes
