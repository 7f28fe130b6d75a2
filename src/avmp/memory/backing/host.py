"""A backing in host memory: one bytearray per physical chunk, no torch.

It really stores the bytes, so tests can check that a unit's contents survive
migration and compaction, and the simulator can run with real data when it wants to.
"""

from __future__ import annotations

from avmp.memory.address_space import unit_spans
from avmp.memory.backing.base import Backing, BackingError
from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind


class HostBacking(Backing):
    """Physical chunks as bytearrays; each pool maps an ordered list of them.

    Unmapping a chunk keeps its bytearray (and bytes) with the chunk, as a VMM backing
    keeps the physical allocation, so a migrated chunk arrives unchanged.
    """

    def __init__(self) -> None:
        self._chunks: list[bytearray] = []
        self._mapped: dict[PoolKind, list[int]] = {PoolKind.KV: [], PoolKind.STATE: []}
        self._attached = False

    def attach(self, spec: CacheSpec, config: MemoryConfig) -> None:
        if self._attached:
            raise BackingError("HostBacking is already attached to a manager")
        super().attach(spec, config)
        # bytearray(n) zero-fills through calloc, so untouched chunks cost no resident memory
        self._chunks = [bytearray(config.chunk_bytes) for _ in range(config.num_chunks)]
        self._attached = True

    def mapped_chunks(self, pool: PoolKind) -> list[int]:
        """The chunks mapped into ``pool``, in address order (a copy)."""
        return list(self._mapped[pool])

    def map_chunks(self, pool: PoolKind, chunk_ids: list[int]) -> None:
        self._require_attached()
        taken = set(self._mapped[PoolKind.KV]) | set(self._mapped[PoolKind.STATE])
        for chunk_id in chunk_ids:
            if not 0 <= chunk_id < len(self._chunks):
                raise BackingError(f"chunk {chunk_id} does not exist")
            if chunk_id in taken:
                raise BackingError(f"chunk {chunk_id} is already mapped")
            taken.add(chunk_id)
        self._mapped[pool].extend(chunk_ids)

    def unmap_chunks(self, pool: PoolKind, num_chunks: int) -> list[int]:
        self._require_attached()
        mapped = self._mapped[pool]
        if not 0 <= num_chunks <= len(mapped):
            raise BackingError(f"{pool.value} pool maps {len(mapped)} chunks, not {num_chunks}")
        keep = len(mapped) - num_chunks
        removed = mapped[keep:]
        del mapped[keep:]
        return removed

    def copy_units(self, pool: PoolKind, moves: list[tuple[int, int]]) -> None:
        for src, dst in moves:
            self._check_index(pool, src)
            self._check_index(pool, dst)
        # read every source before writing, so the batch is correct in any order
        contents = [self.read_unit(pool, src) for src, _ in moves]
        for (_, dst), data in zip(moves, contents, strict=True):
            self.write_unit(pool, dst, data)

    def read_unit(self, pool: PoolKind, index: int) -> bytes:
        self._check_index(pool, index)
        mapped = self._mapped[pool]
        spans = unit_spans(index, self.spec.unit_bytes(pool), self.config.chunk_bytes)
        return b"".join(bytes(self._chunks[mapped[pos]][start:end]) for pos, start, end in spans)

    def write_unit(self, pool: PoolKind, index: int, data: bytes) -> None:
        self._check_index(pool, index)
        unit_bytes = self.spec.unit_bytes(pool)
        if len(data) != unit_bytes:
            raise BackingError(f"a {pool.value} unit holds {unit_bytes} bytes, got {len(data)}")
        mapped = self._mapped[pool]
        written = 0
        for pos, start, end in unit_spans(index, unit_bytes, self.config.chunk_bytes):
            self._chunks[mapped[pos]][start:end] = data[written:written + end - start]
            written += end - start

    def close(self) -> None:
        self._chunks = []
        self._mapped = {PoolKind.KV: [], PoolKind.STATE: []}

    def _require_attached(self) -> None:
        if not self._attached:
            raise BackingError("HostBacking.attach() must be called first")

    def _check_index(self, pool: PoolKind, index: int) -> None:
        self._require_attached()
        unit_bytes = self.spec.unit_bytes(pool)
        mapped_bytes = len(self._mapped[pool]) * self.config.chunk_bytes
        if unit_bytes == 0 or index < 0 or (index + 1) * unit_bytes > mapped_bytes:
            raise BackingError(f"{pool.value} unit {index} is not mapped")
