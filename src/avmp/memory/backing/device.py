"""What the device backings (one torch buffer, CUDA VMM) share: each pool seen as a table
of units, ``[max_units, unit_bytes]`` uint8, over the pool's whole range (its capacity if it
owned every chunk). Compaction, reads and writes go through that table; per-layer views
(views.py) are strided over it.

Rows and unit indices: unit ``i`` of a pool is table row ``row_of(pool, i)``. That is ``i``
except in the one-buffer backing's state pool, which grows down from the top of the buffer
and so keeps unit 0 at the top (row ``max_units - 1``): torch has no negative strides.
Kernels index views with rows (`rows_of`), never with raw unit indices.

The batched row copy that compaction runs comes from above (the engine passes the Triton
copy on CUDA): the backing imports no kernels, and without one it uses torch's.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from avmp.memory.backing.base import Backing, BackingError
from avmp.memory.spec import PoolKind

CopyRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``copy(table, src, dst)``: ``table[dst[i]] = table[src[i]]`` for every i, sources and
destinations disjoint, ``table`` a pool's ``[num_units, unit_bytes]`` uint8 view."""


def copy_rows_torch(table: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """One gather and one scatter on any device (through a temporary)."""
    table.index_copy_(0, dst, table.index_select(0, src))  # [n, unit_bytes]


class TensorBacking(Backing):
    """A backing whose pools are torch-addressable memory on one device.

    Misuse (a chunk mapped twice, an unmapped unit read) raises `BackingError` and
    changes nothing, like a driver failure.

    Args:
        copy_rows: the batched row copy compaction runs (`CopyRows`); None: torch's.
    """

    device: torch.device

    def __init__(self, copy_rows: CopyRows | None = None) -> None:
        self._copy_rows: CopyRows = copy_rows or copy_rows_torch
        self.num_compactions = 0
        self.num_units_copied = 0
        self.num_bytes_compacted = 0  # bytes read + written by copy_units
        self._chunks: dict[PoolKind, list[int]] = {PoolKind.KV: [], PoolKind.STATE: []}
        self._owned: set[int] = set()  # both pools' ids: checks stay O(ids asked), not O(budget)

    @abstractmethod
    def pool_bytes(self, pool: PoolKind) -> torch.Tensor:
        """1-D uint8 tensor over ``pool``'s whole range, ``max_units * unit_bytes`` long;
        only the rows of mapped units may be touched."""

    def num_mapped_chunks(self, pool: PoolKind) -> int:
        """Chunks ``pool`` owns now."""
        return len(self._chunks[pool])

    def mapped_chunks(self, pool: PoolKind) -> list[int]:
        """Ids the pool owns, in its order (tail last)."""
        return list(self._chunks[pool])

    def _check_map(self, chunk_ids: list[int]) -> None:
        if len(set(chunk_ids)) != len(chunk_ids) or not self._owned.isdisjoint(chunk_ids):
            raise BackingError(f"chunks {chunk_ids} repeat or are already mapped")
        if any(not 0 <= c < self.config.num_chunks for c in chunk_ids):
            raise BackingError(f"chunk ids must lie in [0, {self.config.num_chunks})")

    def _record_mapped(self, pool: PoolKind, chunk_ids: list[int]) -> None:
        self._chunks[pool].extend(chunk_ids)
        self._owned.update(chunk_ids)

    def _record_unmapped(self, pool: PoolKind) -> int:
        """Forget the pool's tail chunk; return its id."""
        chunk_id = self._chunks[pool].pop()
        self._owned.discard(chunk_id)
        return chunk_id

    def _check_unmap(self, pool: PoolKind, num_chunks: int) -> None:
        owned = len(self._chunks[pool])
        if not 0 <= num_chunks <= owned:
            raise BackingError(f"{pool.value} pool owns {owned} chunks, cannot unmap {num_chunks}")

    def is_reversed(self, pool: PoolKind) -> bool:
        """Whether unit ``i`` is row ``max_units - 1 - i`` (see the module docstring)."""
        return False

    @property
    def usable_bytes(self) -> int:
        """The bytes of all whole chunks: the most one pool can own."""
        return self.config.num_chunks * self.config.chunk_bytes

    def max_units(self, pool: PoolKind) -> int:
        unit = self.spec.unit_bytes(pool)
        return self.usable_bytes // unit if unit else 0

    def num_mapped_units(self, pool: PoolKind) -> int:
        """Units that lie wholly inside the mapped chunks of ``pool``."""
        unit = self.spec.unit_bytes(pool)
        if not unit:
            return 0
        return self.num_mapped_chunks(pool) * self.config.chunk_bytes // unit

    def row_of(self, pool: PoolKind, index: int) -> int:
        return self.max_units(pool) - 1 - index if self.is_reversed(pool) else index

    def rows_of(self, pool: PoolKind, indices: torch.Tensor) -> torch.Tensor:
        """Table rows of unit indices (any shape, int64)."""
        return self.max_units(pool) - 1 - indices if self.is_reversed(pool) else indices

    def unit_table(self, pool: PoolKind) -> torch.Tensor:
        """``[max_units, unit_bytes]`` uint8 view of ``pool``."""
        return self.pool_bytes(pool).view(self.max_units(pool), self.spec.unit_bytes(pool))

    def _check_index(self, pool: PoolKind, index: int) -> None:
        # an unmapped address is an illegal access that kills the CUDA context
        if not 0 <= index < self.num_mapped_units(pool):
            raise BackingError(
                f"{pool.value} unit {index} is not mapped "
                f"({self.num_mapped_units(pool)} units mapped)"
            )

    def copy_units(self, pool: PoolKind, moves: list[tuple[int, int]]) -> None:
        """Copy every (src, dst) unit with one batched device copy."""
        if not moves:
            return
        pairs = torch.from_numpy(np.asarray(moves, dtype=np.int64))  # [n, 2] on the host
        low, high = int(pairs.min()), int(pairs.max())
        self._check_index(pool, low)
        self._check_index(pool, high)
        rows = self.rows_of(pool, pairs).to(self.device, non_blocking=True)
        self._copy_rows(self.unit_table(pool), rows[:, 0].contiguous(), rows[:, 1].contiguous())
        self.num_compactions += 1
        self.num_units_copied += len(moves)
        self.num_bytes_compacted += 2 * len(moves) * self.spec.unit_bytes(pool)

    def read_unit(self, pool: PoolKind, index: int) -> bytes:
        self._check_index(pool, index)
        row = self.unit_table(pool)[self.row_of(pool, index)]
        return bytes(row.cpu().numpy().tobytes())

    def write_unit(self, pool: PoolKind, index: int, data: bytes) -> None:
        self._check_index(pool, index)
        unit = self.spec.unit_bytes(pool)
        if len(data) != unit:
            raise BackingError(f"a {pool.value} unit is {unit} bytes, got {len(data)}")
        source = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.unit_table(pool)[self.row_of(pool, index)].copy_(source)
