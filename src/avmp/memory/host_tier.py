"""The host tier's bookkeeping: which bytes of the pinned host arena hold which swapped-out
request. Pure bookkeeping, like the allocators: the engine keeps the bytes (a pinned
tensor of `capacity_bytes`) and copies at the offsets handed out here; the simulator only
counts.

A swapped-out request takes one extent: its slot, then its pages, as the device holds
them (`avmp.sched.swap` says the order). Extents are placed first-fit in address order
and aligned to `ALIGNMENT_BYTES`, so copies start on a page of host memory; a released
extent merges with free neighbours, so the arena does not fragment into pieces smaller
than the requests that come and go.

The prefix cache's second level keeps checkpoints evicted from the device in the same
arena, under keys of its own (`reserve_cached`). They are a cache: a swapped-out request
comes first, and `reserve` drops cached checkpoints (through `reclaim_cached`, which the
prefix cache sets to drop its least valuable one) when nothing else makes room.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from avmp.units import round_up

ALIGNMENT_BYTES = 4096  # one host page: copies never start mid-page


@dataclass(frozen=True, slots=True)
class HostExtent:
    """``num_bytes`` bytes of the arena from ``offset`` (the arena sets aside
    `reserved_bytes`, the size rounded up to the alignment)."""

    offset: int
    num_bytes: int

    @property
    def reserved_bytes(self) -> int:
        return round_up(self.num_bytes, ALIGNMENT_BYTES)


class HostTier:
    """First-fit extents over an arena of ``capacity_bytes`` host bytes.

    Running out is a return value (`reserve` gives None); misuse (a request held twice,
    an unknown request) raises.

    Raises:
        ValueError: a negative capacity.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"host tier capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        # free extents, sorted by offset, never adjacent (merged on release)
        self._free_offsets: list[int] = [0] if capacity_bytes else []
        self._free_sizes: list[int] = [capacity_bytes] if capacity_bytes else []
        self._held: dict[int, HostExtent] = {}
        self._cached: dict[int, HostExtent] = {}  # the prefix cache's, by its own keys
        self.used_bytes = 0
        # drops one cached checkpoint so that a request's extent fits; False: none left
        self.reclaim_cached: Callable[[], bool] | None = None

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @property
    def request_ids(self) -> list[int]:
        return list(self._held)

    def holds(self, request_id: int) -> bool:
        return request_id in self._held

    def extent(self, request_id: int) -> HostExtent:
        """Where ``request_id``'s bytes are (KeyError if it holds none)."""
        try:
            return self._held[request_id]
        except KeyError:
            raise KeyError(f"the host tier holds nothing of request {request_id}") from None

    def could_reserve(self, num_bytes: int) -> bool:
        """Whether `reserve` of ``num_bytes`` would succeed now (dropping cached
        checkpoints if need be)."""
        need = round_up(num_bytes, ALIGNMENT_BYTES)
        if self._fits(need):
            return True
        if not self._cached or self.reclaim_cached is None:
            return False
        cached = [(e.offset, e.reserved_bytes) for e in self._cached.values()]
        pieces = sorted([*zip(self._free_offsets, self._free_sizes, strict=True), *cached])
        run_end = run_size = 0
        for offset, size in pieces:  # the runs that free and cached extents make together
            run_size = run_size + size if offset == run_end else size
            run_end = offset + size
            if run_size >= need:
                return True
        return False

    def _fits(self, need: int) -> bool:
        return any(size >= need for size in self._free_sizes)

    def reserve(self, request_id: int, num_bytes: int) -> HostExtent | None:
        """Hand ``request_id`` an extent of ``num_bytes`` bytes (the first free one that
        fits, its size rounded up to the alignment), dropping cached checkpoints while
        none fits; None when none fits even so.

        Raises:
            ValueError: ``num_bytes`` < 1, or ``request_id`` already holds an extent.
        """
        if request_id in self._held:
            raise ValueError(f"request {request_id} already holds a host extent")
        need = self._check_size(num_bytes)
        while (not self._fits(need) and self._cached and self.reclaim_cached is not None
               and self.reclaim_cached()):  # fmt: skip
            pass
        extent = self._take(num_bytes)
        if extent is not None:
            self._held[request_id] = extent
        return extent

    def reserve_cached(self, key: int, num_bytes: int) -> HostExtent | None:
        """An extent for the prefix cache's checkpoint ``key`` when one fits now (a
        cached checkpoint never displaces anything); None otherwise.

        Raises:
            ValueError: ``num_bytes`` < 1, or ``key`` already holds an extent.
        """
        if key in self._cached:
            raise ValueError(f"cached checkpoint {key} already holds a host extent")
        self._check_size(num_bytes)
        extent = self._take(num_bytes)
        if extent is not None:
            self._cached[key] = extent
        return extent

    def could_reserve_cached(self, num_bytes: int) -> bool:
        """Whether `reserve_cached` of ``num_bytes`` would succeed now."""
        return self._fits(round_up(num_bytes, ALIGNMENT_BYTES))

    def cached_extent(self, key: int) -> HostExtent:
        """Where cached checkpoint ``key``'s bytes are (KeyError if it holds none)."""
        try:
            return self._cached[key]
        except KeyError:
            raise KeyError(f"the host tier holds no cached checkpoint {key}") from None

    @property
    def cached_keys(self) -> list[int]:
        return sorted(self._cached)

    @property
    def cached_bytes(self) -> int:
        """Bytes the cached checkpoints take (with their alignment)."""
        return sum(extent.reserved_bytes for extent in self._cached.values())

    def release_cached(self, key: int) -> HostExtent:
        """Give cached checkpoint ``key``'s extent back; returns it."""
        extent = self.cached_extent(key)
        del self._cached[key]
        self._give_back(extent)
        return extent

    @staticmethod
    def _check_size(num_bytes: int) -> int:
        if num_bytes < 1:
            raise ValueError(f"a host extent needs at least 1 byte, got {num_bytes}")
        return round_up(num_bytes, ALIGNMENT_BYTES)

    def _take(self, num_bytes: int) -> HostExtent | None:
        """Carve ``num_bytes`` (rounded up) out of the first free extent that fits."""
        need = round_up(num_bytes, ALIGNMENT_BYTES)
        index = next((i for i, size in enumerate(self._free_sizes) if size >= need), -1)
        if index < 0:
            return None
        offset, size = self._free_offsets[index], self._free_sizes[index]
        if size == need:
            del self._free_offsets[index], self._free_sizes[index]
        else:
            self._free_offsets[index] = offset + need
            self._free_sizes[index] = size - need
        self.used_bytes += need
        return HostExtent(offset, num_bytes)

    def release(self, request_id: int) -> HostExtent:
        """Give ``request_id``'s extent back (merged with free neighbours); returns it."""
        extent = self.extent(request_id)
        del self._held[request_id]
        self._give_back(extent)
        return extent

    def _give_back(self, extent: HostExtent) -> None:
        self.used_bytes -= extent.reserved_bytes
        offsets, sizes = self._free_offsets, self._free_sizes
        index = bisect.bisect_left(offsets, extent.offset)
        offset, size = extent.offset, extent.reserved_bytes
        if index < len(offsets) and offset + size == offsets[index]:  # merge the next
            size += sizes[index]
            del offsets[index], sizes[index]
        if index > 0 and offsets[index - 1] + sizes[index - 1] == offset:  # and the previous
            sizes[index - 1] += size
        else:
            offsets.insert(index, offset)
            sizes.insert(index, size)

    def check_integrity(self) -> None:
        """Raise AssertionError unless free and held extents tile the arena exactly."""
        pieces = sorted(
            [(o, s, "free") for o, s in zip(self._free_offsets, self._free_sizes, strict=True)]
            + [(e.offset, e.reserved_bytes, "held") for e in self._held.values()]
            + [(e.offset, e.reserved_bytes, "cached") for e in self._cached.values()]
        )
        position = 0
        for offset, size, _ in pieces:
            assert offset == position, f"gap or overlap at byte {position} (next {offset})"
            assert size > 0
            position += size
        assert position == self.capacity_bytes, f"extents cover {position} bytes"
        held = [*self._held.values(), *self._cached.values()]
        assert self.used_bytes == sum(e.reserved_bytes for e in held)
        for a, b in zip(self._free_offsets, self._free_offsets[1:], strict=False):
            assert a < b
        for i in range(len(self._free_offsets) - 1):
            end = self._free_offsets[i] + self._free_sizes[i]
            assert end < self._free_offsets[i + 1], "adjacent free extents not merged"
