"""Both pools inside one torch buffer of the whole budget, growing toward each other.

Memory map (``N`` chunks of ``C`` bytes, unit sizes ``P`` for pages and ``S`` for slots)::

    buffer chunk:  0   1  ...  k-1 | free ... | N-m ... N-2  N-1
                   KV pool, grows up            state pool, grows down
    KV page p:      bytes [p*P, (p+1)*P)                     (ascending from the bottom)
    state slot s:   bytes [N*C - (s+1)*S, N*C - s*S)         (slot 0 at the top)

The KV pool's j-th chunk is always buffer chunk ``j`` and the state pool's j-th chunk
buffer chunk ``N-1-j``, so growing a pool never moves a unit, and every unit is contiguous
bytes even where it straddles chunks. A state slot occupies the mirror image of the byte
interval it has in the pool's virtual range, hence it overlaps exactly the chunks the
manager thinks it overlaps: a chunk free in the manager's view is free here.

Chunk ids are labels. A pool's chunks sit where its position says, whatever their ids;
when a chunk id comes back at another place, its bytes are copied there (one batched copy
per call) so the contract "bytes are kept" holds. With the id rule of the manager
(migration maps the donor's ids tail first; KV takes the lowest free ids, state the
highest) the donor's tail chunk *is* the recipient's next chunk and migration copies zero
bytes: it only moves the boundary. ``num_migration_bytes_copied`` counts what was copied.
"""

from __future__ import annotations

import torch

from avmp.memory.backing.device import CopyRows, TensorBacking
from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind


class TorchBufferBacking(TensorBacking):
    """One uint8 buffer of ``num_chunks * chunk_bytes`` on any torch device."""

    def __init__(
        self, device: str | torch.device = "cpu", copy_rows: CopyRows | None = None
    ) -> None:
        super().__init__(copy_rows)
        self.device = torch.device(device)
        self._buffer: torch.Tensor | None = None
        self._home: dict[int, int] = {}  # chunk id -> buffer chunk holding its bytes
        self._holder: dict[int, int] = {}  # buffer chunk -> id whose bytes it holds
        self.num_migration_bytes_copied = 0

    def attach(self, spec: CacheSpec, config: MemoryConfig) -> None:
        super().attach(spec, config)
        self._buffer = torch.empty(self.usable_bytes, dtype=torch.uint8, device=self.device)

    @property
    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            raise RuntimeError("backing not attached (or closed)")
        return self._buffer

    def _position(self, pool: PoolKind, slot_in_pool: int) -> int:
        """Buffer chunk of the pool's ``slot_in_pool``-th chunk."""
        if pool is PoolKind.KV:
            return slot_in_pool
        return self.config.num_chunks - 1 - slot_in_pool

    def is_reversed(self, pool: PoolKind) -> bool:
        return pool is PoolKind.STATE

    def pool_bytes(self, pool: PoolKind) -> torch.Tensor:
        span = self.max_units(pool) * self.spec.unit_bytes(pool)
        if pool is PoolKind.KV:
            return self.buffer[:span]
        return self.buffer[self.usable_bytes - span :]

    def map_chunks(self, pool: PoolKind, chunk_ids: list[int]) -> None:
        """Map ``chunk_ids`` at the pool's tail; bytes of ids that lived elsewhere follow."""
        self._check_map(chunk_ids)
        start = len(self._chunks[pool])
        moves: list[tuple[int, int]] = []
        for offset, chunk_id in enumerate(chunk_ids):
            target = self._position(pool, start + offset)
            home = self._home.get(chunk_id)
            if home is not None and home != target and self._holder.get(home) == chunk_id:
                moves.append((home, target))
        self._copy_chunks(moves)
        for offset, chunk_id in enumerate(chunk_ids):
            target = self._position(pool, start + offset)
            self._home[chunk_id] = target
            self._holder[target] = chunk_id
        self._record_mapped(pool, chunk_ids)

    def _copy_chunks(self, moves: list[tuple[int, int]]) -> None:
        """Move whole chunks (src, dst) as one gather + scatter (safe for permutations)."""
        if not moves:
            return
        chunks = self.buffer.view(self.config.num_chunks, self.config.chunk_bytes)
        index = torch.tensor(moves, dtype=torch.int64, device=self.device)  # [n, 2]
        chunks.index_copy_(0, index[:, 1], chunks.index_select(0, index[:, 0]))
        self.num_migration_bytes_copied += 2 * len(moves) * self.config.chunk_bytes

    def unmap_chunks(self, pool: PoolKind, num_chunks: int) -> list[int]:
        self._check_unmap(pool, num_chunks)
        if num_chunks == 0:
            return []
        released = [self._record_unmapped(pool) for _ in range(num_chunks)]
        return released[::-1]

    def close(self) -> None:
        self._buffer = None
        self._chunks = {PoolKind.KV: [], PoolKind.STATE: []}
        self._owned.clear()
        self._home.clear()
        self._holder.clear()
