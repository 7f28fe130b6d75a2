"""Both pools in one CUDA virtual reservation; physical 2 MiB chunks move between them
without a byte copied.

Reservation (``B`` = num_chunks * chunk_bytes, the whole budget)::

    base            base + B            base + 2B
    | KV range (B)  | state range (B)   |

Each pool's range is as large as the whole budget, so either pool can own every chunk.
The pool's j-th chunk is mapped at ``range + j * chunk_bytes``; unit ``i`` lives at
``range + i * unit_bytes`` and may straddle two chunks (the range is virtually
contiguous). A physical chunk is made with ``cuMemCreate`` the first time its id is mapped
(so memory is taken only as the pools grow) and kept until `close()`. Migration unmaps the
donor's tail chunks and maps the same handles at the recipient's tail: the bytes stay in
place physically. Driver calls use PyTorch's primary context (made current by touching
torch.cuda first). Every driver error raises `BackingError` naming the call and the error.

Unmapping is the one driver operation that the device's stream does not order: work
already queued (the step in flight, a compaction reading the donor's tail) may still
touch the donor's addresses. Instead of waiting for the device, the donor's addresses
stay mapped until an event recorded behind that work has completed (`DeferredUnmaps`);
the recipient maps the same physical chunk at its own addresses at once (a chunk may be
mapped at two addresses), and whatever it writes there is queued behind the event. So a
migration never stalls the host while a step runs: the engine keeps planning the next
step during the current one (docs/design-engine.md, overlap).
"""

from __future__ import annotations

import atexit
import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from avmp.memory.backing.base import BackingError
from avmp.memory.backing.device import CopyRows, TensorBacking
from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind


def _load_driver() -> Any:
    try:
        return importlib.import_module("cuda.bindings.driver")
    except ImportError as exc:
        raise BackingError(
            "CudaVmmBacking needs cuda-python (pip install 'avmp[gpu]'): "
            f"cannot import cuda.bindings.driver ({exc})"
        ) from exc


class _CudaArray:
    """An object torch can wrap (``__cuda_array_interface__`` v3) without owning memory."""

    def __init__(self, pointer: int, num_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 3,
            "strides": None,
        }


class _Event(Protocol):
    """What `DeferredUnmaps` needs of a ``torch.cuda.Event``."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class DeferredUnmaps:
    """Chunk addresses waiting to be unmapped until the device has finished the work queued
    before their event.

    Events complete in the order they were recorded on one stream, so `reap` stops at the
    first that has not. An address mapped again (a pool that shrank and grows back before
    the device caught up) is first waited for and unmapped (`settle`).
    """

    def __init__(self, unmap: Callable[[int], None]) -> None:
        self._unmap = unmap
        self._pending: list[tuple[int, _Event]] = []  # in the order they were retired

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, address: object) -> bool:
        return any(pending == address for pending, _ in self._pending)

    def add(self, addresses: list[int], event: _Event) -> None:
        """Unmap ``addresses`` once ``event`` has completed."""
        self._pending.extend((address, event) for address in addresses)

    def reap(self) -> int:
        """Unmap every address whose event has completed, without waiting; how many."""
        done = 0
        while done < len(self._pending) and self._pending[done][1].query():
            done += 1
        self._unmap_first(done)
        return done

    def settle(self, address: int) -> None:
        """Wait for ``address``'s event if it is pending, then unmap it (and every address
        retired before it, whose events have completed by then)."""
        for index, (pending, event) in enumerate(self._pending):
            if pending == address:
                event.synchronize()
                self._unmap_first(index + 1)
                return

    def settle_all(self) -> None:
        """Wait for every pending event and unmap every address."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self._unmap_first(len(self._pending))

    def _unmap_first(self, count: int) -> None:
        # one at a time, dropping each once unmapped: if a driver call fails, what is
        # left pending is exactly what is still mapped
        for _ in range(count):
            self._unmap(self._pending[0][0])
            self._pending.pop(0)


class CudaVmmBacking(TensorBacking):
    """KV and state pools over one reserved virtual range, chunks mapped on demand."""

    def __init__(self, device: int = 0, copy_rows: CopyRows | None = None) -> None:
        super().__init__(copy_rows)
        self._driver = _load_driver()
        if not torch.cuda.is_available():
            raise BackingError("CudaVmmBacking needs a CUDA device (torch sees none)")
        self.device_index = device
        self.device = torch.device("cuda", device)
        torch.zeros(1, device=self.device)  # makes PyTorch's primary context current
        self._reservation = 0
        self._reserved_bytes = 0
        self._handles: dict[int, int] = {}  # chunk id -> physical handle (created lazily)
        self._tensors: dict[PoolKind, torch.Tensor] = {}
        self._closed = False
        self.num_chunks_created = 0
        self._retired = DeferredUnmaps(self._unmap)

    # ----- driver plumbing -------------------------------------------------------------

    def _call(self, name: str, *args: Any) -> Any:
        """Call one driver function; raise BackingError on any result but success."""
        result = getattr(self._driver, name)(*args)
        status = result[0]
        if status != self._driver.CUresult.CUDA_SUCCESS:
            raise BackingError(f"{name} failed: {self._error_name(status)}")
        values = result[1:]
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def _error_name(self, status: Any) -> str:
        found, name = self._driver.cuGetErrorName(status)
        if found != self._driver.CUresult.CUDA_SUCCESS:
            return str(status)
        return name.decode() if isinstance(name, bytes) else str(name)

    def _allocation_prop(self) -> Any:
        """A fresh allocation-properties struct (pinned device memory on our device)."""
        drv = self._driver
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device_index
        return prop

    def _access_desc(self) -> Any:
        drv = self._driver
        desc = drv.CUmemAccessDesc()
        desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device_index
        desc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        return desc

    def granularity_bytes(self) -> int:
        flag = self._driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        return int(self._call("cuMemGetAllocationGranularity", self._allocation_prop(), flag))

    def memory_info(self) -> tuple[int, int]:
        """(free, total) device bytes, from cuMemGetInfo."""
        free, total = self._call("cuMemGetInfo")
        return int(free), int(total)

    def _create_chunk(self) -> int:
        """One physical chunk (a seam for tests that inject a cuMemCreate failure)."""
        handle = self._call("cuMemCreate", self.config.chunk_bytes, self._prop, 0)
        return int(handle)

    def _map(self, address: int, handle: int) -> None:
        self._call("cuMemMap", address, self.config.chunk_bytes, 0, handle, 0)

    def _unmap(self, address: int) -> None:
        self._call("cuMemUnmap", address, self.config.chunk_bytes)

    def _set_access(self, address: int, num_bytes: int) -> None:
        self._call("cuMemSetAccess", address, num_bytes, self._access, 1)

    # ----- lifecycle ---------------------------------------------------------------------

    def attach(self, spec: CacheSpec, config: MemoryConfig) -> None:
        """Check the budget, reserve both ranges and wrap them as tensors."""
        super().attach(spec, config)
        # built once: making these structs costs microseconds on every map otherwise
        self._prop = self._allocation_prop()
        self._access = [self._access_desc()]
        granularity = self.granularity_bytes()
        if config.chunk_bytes % granularity:
            raise BackingError(
                f"chunk_bytes {config.chunk_bytes} is not a multiple of the device's VMM "
                f"granularity {granularity}"
            )
        free, _ = self.memory_info()
        if self.usable_bytes > free:
            raise BackingError(
                f"budget of {self.usable_bytes} bytes ({config.num_chunks} chunks) exceeds the "
                f"{free} bytes free on cuda:{self.device_index} (cuMemGetInfo); lower budget_bytes"
            )
        self._reserved_bytes = 2 * self.usable_bytes
        reserved = self._call("cuMemAddressReserve", self._reserved_bytes, granularity, 0, 0)
        self._reservation = int(reserved)
        atexit.register(self.close)
        try:
            self._wrap_pools()
        except BaseException:
            self.close()
            raise

    def _range_base(self, pool: PoolKind) -> int:
        return self._reservation + (0 if pool is PoolKind.KV else self.usable_bytes)

    def _wrap_pools(self) -> None:
        """Wrap each pool's range as a uint8 tensor.

        torch asks the driver which device a pointer is on, which fails for an unmapped
        address; a scratch chunk is mapped at the range base only while the tensor is
        made, then released. The tensor keeps just the address.
        """
        scratch = self._create_chunk()
        try:
            for pool in PoolKind:
                base = self._range_base(pool)
                span = self.max_units(pool) * self.spec.unit_bytes(pool)
                self._map(base, scratch)
                try:
                    self._set_access(base, self.config.chunk_bytes)
                    wrapped = torch.as_tensor(_CudaArray(base, span), device=self.device)
                    self._tensors[pool] = wrapped
                finally:
                    self._unmap(base)
        finally:
            self._call("cuMemRelease", scratch)

    def close(self) -> None:
        """Unmap every chunk, release every handle, free the reservation; idempotent.

        Views built over this backing point at freed addresses afterwards: drop them.
        """
        if self._closed or not self._reservation:
            self._closed = True
            return
        self._closed = True
        atexit.unregister(self.close)
        torch.cuda.synchronize(self.device)
        self._retired.settle_all()
        self._tensors.clear()
        for pool in PoolKind:
            for position in range(len(self._chunks[pool])):
                self._unmap(self._chunk_address(pool, position))
            self._chunks[pool] = []
        self._owned.clear()
        for handle in self._handles.values():
            self._call("cuMemRelease", handle)
        self._handles.clear()
        self._call("cuMemAddressFree", self._reservation, self._reserved_bytes)
        self._reservation = 0

    def __del__(self) -> None:
        if getattr(self, "_reservation", 0) and not getattr(self, "_closed", True):
            self.close()

    # ----- Backing -----------------------------------------------------------------------

    def _chunk_address(self, pool: PoolKind, position: int) -> int:
        return self._range_base(pool) + position * self.config.chunk_bytes

    @property
    def num_handles(self) -> int:
        """Physical chunks held now."""
        return len(self._handles)

    def pool_bytes(self, pool: PoolKind) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("backing is closed")
        return self._tensors[pool]

    def map_chunks(self, pool: PoolKind, chunk_ids: list[int]) -> None:
        """Map the chunks (made on first use) at the pool's tail, then set access once.

        On any driver failure, undo this call's mappings and release the chunks it made,
        then raise BackingError: the backing is as it was.
        """
        self._check_map(chunk_ids)
        if not chunk_ids:
            return
        self._retired.reap()
        start = len(self._chunks[pool])
        created: list[int] = []
        mapped: list[int] = []
        try:
            for offset, chunk_id in enumerate(chunk_ids):
                if chunk_id not in self._handles:
                    self._handles[chunk_id] = self._create_chunk()
                    created.append(chunk_id)
                address = self._chunk_address(pool, start + offset)
                self._retired.settle(address)  # still mapped from before a shrink
                self._map(address, self._handles[chunk_id])
                mapped.append(address)
            new_bytes = len(chunk_ids) * self.config.chunk_bytes
            self._set_access(self._chunk_address(pool, start), new_bytes)
        except BackingError:
            self._undo_map(mapped, created)
            raise
        self.num_chunks_created += len(created)
        self._record_mapped(pool, chunk_ids)

    def _undo_map(self, mapped: list[int], created: list[int]) -> None:
        for address in mapped:
            self._unmap(address)
        for chunk_id in created:
            self._call("cuMemRelease", self._handles.pop(chunk_id))

    def unmap_chunks(self, pool: PoolKind, num_chunks: int) -> list[int]:
        """Take the pool's last chunks away; their handles (and bytes) are kept for reuse
        and may be mapped elsewhere at once.

        Their addresses are unmapped later, once the device has finished the work queued
        so far (a step in flight, a compaction that just read these chunks): an event is
        recorded on the current stream, and the host does not wait for it.
        """
        self._check_unmap(pool, num_chunks)
        owned = self._chunks[pool]
        if num_chunks == 0:
            return []
        self._retired.reap()
        released = owned[-num_chunks:]
        addresses = []
        for _ in released:  # tail first
            addresses.append(self._chunk_address(pool, len(owned) - 1))
            self._record_unmapped(pool)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        self._retired.add(addresses, event)
        return released

    @property
    def num_deferred_unmaps(self) -> int:
        """Chunk addresses unmapped from a pool but still mapped until the device catches up."""
        return len(self._retired)
