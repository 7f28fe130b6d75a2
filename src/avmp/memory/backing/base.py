"""The contract between the AVMP manager (which decides) and a backing (which holds the
bytes and executes the decisions).

Physical chunks are numbered ``0 .. num_chunks - 1``. Each pool is a virtual range
whose mapped prefix is the ordered list of chunks the pool owns; unit ``i`` of a pool
lives at byte ``i * unit_bytes`` of that range and may straddle two chunks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind


class BackingError(RuntimeError):
    """The backing could not carry out an operation (e.g. a driver call failed).

    The backing leaves its own state as it was before the failing call.
    """


class Backing(ABC):
    """Where the bytes of both pools live, and how a chunk changes owner."""

    def attach(self, spec: CacheSpec, config: MemoryConfig) -> None:
        """Called once by the manager before any other call."""
        self.spec = spec
        self.config = config

    @abstractmethod
    def map_chunks(self, pool: PoolKind, chunk_ids: list[int]) -> None:
        """Map the given physical chunks, in order, at the tail of ``pool``'s range.

        Raises:
            BackingError: nothing was mapped.
        """

    @abstractmethod
    def unmap_chunks(self, pool: PoolKind, num_chunks: int) -> list[int]:
        """Unmap the last ``num_chunks`` chunks of ``pool`` and return their ids, tail
        last. Their bytes are kept (a migration maps them elsewhere unchanged)."""

    @abstractmethod
    def copy_units(self, pool: PoolKind, moves: list[tuple[int, int]]) -> None:
        """Copy whole units inside ``pool``: each (src, dst) pair, all as one batch.

        Sources and destinations are disjoint sets; every unit is mapped.
        """

    @abstractmethod
    def read_unit(self, pool: PoolKind, index: int) -> bytes:
        """The bytes of one unit (for tests and debugging)."""

    @abstractmethod
    def write_unit(self, pool: PoolKind, index: int, data: bytes) -> None:
        """Overwrite one unit (for tests and debugging)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything the backing holds; idempotent."""

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
