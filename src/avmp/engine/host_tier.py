"""The engine's host tier: the bytes of swapped-out requests in one host arena, and the
copies that move them between the arena and the pools (`avmp.sched.swap.Swapper`).

The arena is host memory, pinned when the device is CUDA (so copies are DMA and
asynchronous), plain memory on the CPU. It is allocated in segments of
`SEGMENT_BYTES`, each when an extent first reaches it: pinning costs about a second
per few GiB, so a tier of twice a large cache budget pinned up front would slow every
engine start, for swaps that growth-aware admission makes rare. An extent that straddles
two segments is copied in two pieces. `avmp.memory.host_tier.HostTier` says which
bytes of it belong to whom; this module only copies, at the offsets it is handed, in
the order `avmp.sched.swap` fixes: the slot, then the pages in token order, each unit
as the pools hold it (a row of the backing's unit table, padding included).

Ordering on CUDA: every copy runs on one dedicated copy stream. Before issuing, that
stream waits for the compute stream (the victim's last writes; units freed by finished
requests whose kernels may still run); after issuing, the compute stream waits for it
(no later kernel, compaction or migration touches those units before the copy is done).
The arena is only ever touched by the copy stream, so an extent released and handed out
again within one plan is read before it is overwritten. Device staging buffers are
allocated on the copy stream and used only there, so the caching allocator cannot give
their memory to other work before the copies finish.

What overlaps and what does not: the host never blocks on a copy, so planning and
launching the following steps overlap with it; but the device's compute kernels issued
after a swap wait for that swap's copy (it is on the critical path of the next step),
because the scheduler may hand the victim's units to another request within the same
plan. A swap overlaps with device work issued *before* it, not after.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from avmp.engine.runner import ModelRunner, PoolViews, SequenceWork
from avmp.memory.backing.device import TensorBacking
from avmp.memory.backing.unit_format import CacheFormat
from avmp.memory.host_tier import HostExtent
from avmp.memory.spec import NO_SLOT, CacheAllocator, PoolKind, RequestUnits

SEGMENT_BYTES = 512 << 20  # pinned when first used: about a tenth of a second each
BANDWIDTH_PROBE_BYTES = 32 << 20  # large enough that a copy's fixed cost is noise
BANDWIDTH_PROBE_REPEATS = 3


class HostSwapper:
    """Copies swapped-out requests' units between the pools of ``backing`` and a host
    arena of ``capacity_bytes`` (the scheduler's `avmp.sched.swap.Swapper`).

    Args:
        backing: the attached backing that holds the pools.
        cache_format: the byte format of a page and a slot (the allocator's).
        capacity_bytes: size of the arena (the scheduler's host tier).
    Raises:
        ValueError: a negative capacity, or a format whose units differ from the backing's.
    """

    def __init__(
        self, backing: TensorBacking, cache_format: CacheFormat, capacity_bytes: int
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"host tier capacity must be >= 0 bytes, got {capacity_bytes}")
        cache_format.check_spec(backing.spec)
        self.backing = backing
        self.device = backing.device
        self.page_unit_bytes = cache_format.page.unit_bytes
        self.slot_unit_bytes = cache_format.slot.unit_bytes
        is_cuda = self.device.type == "cuda"
        self._pinned = is_cuda
        self._capacity_bytes = capacity_bytes
        self._segments: list[torch.Tensor] = []  # the arena's first bytes, in order
        stream = torch.cuda.Stream(self.device) if is_cuda else None  # type: ignore[no-untyped-call]
        self.copy_stream = stream
        self.num_bytes_out = 0
        self.num_bytes_in = 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @property
    def allocated_bytes(self) -> int:
        """Host bytes allocated so far (whole segments, at most the capacity)."""
        return sum(segment.numel() for segment in self._segments)

    @property
    def pinned(self) -> bool:
        """Whether the arena is pinned (on CUDA) rather than plain host memory."""
        return self._pinned

    def host_bytes(self, offset: int, num_bytes: int) -> torch.Tensor:
        """A copy of the arena's bytes ``[offset, offset + num_bytes)``, once the copies
        issued so far are done (for checks and tests)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        return torch.cat([piece for piece, _ in self._host_pieces(offset, num_bytes)])

    def _host_pieces(self, offset: int, num_bytes: int) -> list[tuple[torch.Tensor, int]]:
        """The arena's bytes ``[offset, offset + num_bytes)`` as (host slice, its start
        within the extent) pieces, one per segment it touches, allocating segments up
        to its end."""
        end = offset + num_bytes
        while self.allocated_bytes < end:
            size = min(SEGMENT_BYTES, self._capacity_bytes - self.allocated_bytes)
            self._segments.append(torch.empty(size, dtype=torch.uint8, pin_memory=self._pinned))
        pieces = []
        for index, segment in enumerate(self._segments):
            seg_start = index * SEGMENT_BYTES
            low, high = max(offset, seg_start), min(end, seg_start + segment.numel())
            if low < high:
                pieces.append((segment[low - seg_start : high - seg_start], low - offset))
        return pieces

    def swap_out(self, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        """Copy ``units`` (slot first, then pages) into the arena at ``extent``."""
        has_slot = units.slot != NO_SLOT
        self._check_extent(extent, has_slot, len(units.pages))
        pieces = self._host_pieces(extent.offset, extent.num_bytes)
        with self._ordered():
            staging = torch.empty(extent.num_bytes, dtype=torch.uint8, device=self.device)
            slot_bytes, page_bytes = self._split(staging, has_slot, len(units.pages))
            if has_slot:
                slot_bytes.copy_(self._slot_row(units.slot))
            if units.pages:
                table = self.backing.unit_table(PoolKind.KV)  # [max_pages, page_unit_bytes]
                torch.index_select(table, 0, self._page_rows(units.pages), out=page_bytes)
            for host, start in pieces:
                host.copy_(staging[start : start + host.numel()], non_blocking=True)
        self.num_bytes_out += extent.num_bytes

    def swap_in(self, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        """Copy the arena's ``extent`` back: the slot into ``units.slot`` and the saved
        pages into the first pages of ``units.pages``.

        Raises:
            ValueError: ``units`` cannot take what the extent holds.
        """
        has_slot = units.slot != NO_SLOT
        num_saved = self._num_saved_pages(extent, has_slot)
        if num_saved > len(units.pages):
            raise ValueError(
                f"request {request_id}: {num_saved} saved pages, {len(units.pages)} to fill"
            )
        pieces = self._host_pieces(extent.offset, extent.num_bytes)
        with self._ordered():
            staging = torch.empty(extent.num_bytes, dtype=torch.uint8, device=self.device)
            for host, start in pieces:
                staging[start : start + host.numel()].copy_(host, non_blocking=True)
            slot_bytes, page_bytes = self._split(staging, has_slot, num_saved)
            if has_slot:
                self._slot_row(units.slot).copy_(slot_bytes)
            if num_saved:
                table = self.backing.unit_table(PoolKind.KV)
                table.index_copy_(0, self._page_rows(units.pages[:num_saved]), page_bytes)
        self.num_bytes_in += extent.num_bytes

    # -- helpers ------------------------------------------------------------------------

    @contextmanager
    def _ordered(self) -> Iterator[None]:
        """Run the block's device work on the copy stream, after the compute stream's
        work so far and before any it is given later (a no-op on the CPU)."""
        stream = self.copy_stream
        if stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            yield
        current.wait_stream(stream)

    def _slot_row(self, slot: int) -> torch.Tensor:
        """The slot's bytes, ``[slot_unit_bytes]`` uint8, on the device."""
        row = self.backing.row_of(PoolKind.STATE, slot)
        return self.backing.unit_table(PoolKind.STATE)[row]

    def _page_rows(self, pages: tuple[int, ...]) -> torch.Tensor:
        """Table rows of ``pages`` on the device. The index goes through pinned memory:
        a copy from pageable memory would make the host wait for the copy stream."""
        rows = self.backing.rows_of(PoolKind.KV, torch.tensor(pages, dtype=torch.int64))
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def _split(
        self, staging: torch.Tensor, has_slot: bool, num_pages: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's bytes ``[slot_unit_bytes]`` (empty without a slot) and the pages'
        ``[num_pages, page_unit_bytes]`` inside one extent's bytes."""
        slot_end = self.slot_unit_bytes if has_slot else 0
        pages_end = slot_end + num_pages * self.page_unit_bytes
        return staging[:slot_end], staging[slot_end:pages_end].view(num_pages, self.page_unit_bytes)

    def _num_saved_pages(self, extent: HostExtent, has_slot: bool) -> int:
        page_bytes = extent.num_bytes - (self.slot_unit_bytes if has_slot else 0)
        if page_bytes == 0:
            return 0
        if page_bytes < 0 or not self.page_unit_bytes or page_bytes % self.page_unit_bytes:
            raise ValueError(f"an extent of {extent.num_bytes} bytes is not a slot and pages")
        return page_bytes // self.page_unit_bytes

    def _check_extent(self, extent: HostExtent, has_slot: bool, num_pages: int) -> None:
        need = (self.slot_unit_bytes if has_slot else 0) + num_pages * self.page_unit_bytes
        if extent.num_bytes != need:
            raise ValueError(f"the units take {need} bytes, the extent {extent.num_bytes}")
        if extent.offset < 0 or extent.offset + extent.num_bytes > self.capacity_bytes:
            raise ValueError(
                f"extent [{extent.offset}, {extent.offset + extent.num_bytes}) lies outside "
                f"the {self.capacity_bytes}-byte arena"
            )


# ---- the rates the swap-or-recompute rule compares ---------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for all of ``device``'s work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, num_bytes: int = BANDWIDTH_PROBE_BYTES) -> float:
    """Bytes per second of one host <-> device copy direction, timed over copies of
    ``num_bytes`` between pinned host memory (plain on the CPU) and the device, both
    directions alternating, after one untimed round."""
    host = torch.zeros(num_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    on_device = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    on_device.copy_(host)
    host.copy_(on_device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(BANDWIDTH_PROBE_REPEATS):
        on_device.copy_(host, non_blocking=True)
        host.copy_(on_device, non_blocking=True)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return 2 * BANDWIDTH_PROBE_REPEATS * num_bytes / elapsed


def measure_prefill_s_per_token(
    runner: ModelRunner,
    views: PoolViews,
    allocator: CacheAllocator,
    request_id: int,
    num_tokens: int,
    vocab_size: int,
) -> float | None:
    """Device seconds per token of one prefill chunk of ``num_tokens`` tokens (fewer,
    halving, where the memory cannot hold that many), timed on the second of two runs
    so that one-time costs (kernel compilation, first allocations) stay out.

    The chunk runs under ``request_id`` in ``allocator``'s memory, freed afterwards.
    Returns None when not even one token fits (then no request can ever run).
    """
    while num_tokens > 1 and not allocator.fits_alone(num_tokens):
        num_tokens //= 2
    units = allocator.admit(request_id, num_tokens) if allocator.fits_alone(num_tokens) else None
    if units is None:
        return None
    try:
        tokens = [3 + i % max(vocab_size - 3, 1) for i in range(num_tokens)]
        slot = views.slot_row(units.slot) if units.slot != NO_SLOT else 0
        work = [SequenceWork(tokens, 0, slot, views.page_rows(units.pages), True)]
        runner.execute(work)
        synchronize(runner.device)
        start = time.perf_counter()
        runner.execute(work)
        synchronize(runner.device)
        return (time.perf_counter() - start) / num_tokens
    finally:
        allocator.free(request_id)
