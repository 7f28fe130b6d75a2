"""One plain buffer that both pools view: the memory of vLLM's unified block pool.

Nothing is mapped or migrated: the whole buffer is allocated at `attach` and both unit
tables start at its first byte, the KV pool's with page-sized rows and the state pool's
with slot-sized rows. The allocator that drives it (`avmp.memory.unified.UnifiedAllocator`)
keeps pages and slots from overlapping; this backing only checks that an index lies in the
buffer.
"""

from __future__ import annotations

import torch

from avmp.memory.backing.base import BackingError
from avmp.memory.backing.device import TensorBacking
from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind


class SharedBufferBacking(TensorBacking):
    """``num_bytes`` of device memory seen as a page table and as a slot table."""

    def __init__(self, num_bytes: int, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if num_bytes <= 0:
            raise ValueError(f"num_bytes must be positive, got {num_bytes}")
        self.device = torch.device(device)
        self._num_bytes = num_bytes
        self._buffer: torch.Tensor | None = None

    def attach(self, spec: CacheSpec, config: MemoryConfig) -> None:
        super().attach(spec, config)
        self._buffer = torch.zeros(self._num_bytes, dtype=torch.uint8, device=self.device)

    @property
    def usable_bytes(self) -> int:
        return self._num_bytes

    def num_mapped_units(self, pool: PoolKind) -> int:
        return self.max_units(pool)  # the whole buffer is there from the start

    def pool_bytes(self, pool: PoolKind) -> torch.Tensor:
        if self._buffer is None:
            raise RuntimeError("backing not attached (or closed)")
        return self._buffer[: self.max_units(pool) * self.spec.unit_bytes(pool)]

    def map_chunks(self, pool: PoolKind, chunk_ids: list[int]) -> None:
        raise BackingError("a shared buffer has no chunks to map: it is whole from the start")

    def unmap_chunks(self, pool: PoolKind, num_chunks: int) -> list[int]:
        raise BackingError("a shared buffer has no chunks to unmap")

    def close(self) -> None:
        self._buffer = None
