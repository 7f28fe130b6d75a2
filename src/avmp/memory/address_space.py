"""Where units sit in chunks, and which chunks nobody owns yet.

Each pool is one contiguous virtual range: unit ``i`` lives at byte ``i * unit_bytes``
of it, and the range's mapped prefix is the ordered list of chunks the pool owns. A unit
may straddle chunk boundaries, so a chunk's size never has to divide a unit's size.
"""

from __future__ import annotations

from avmp.units import ceil_div


def units_for_chunks(num_chunks: int, unit_bytes: int, chunk_bytes: int) -> int:
    """Whole units that ``num_chunks`` chunks hold (0 for a pool of empty units)."""
    if unit_bytes == 0:
        return 0
    return num_chunks * chunk_bytes // unit_bytes


def chunks_for_units(num_units: int, unit_bytes: int, chunk_bytes: int) -> int:
    """The fewest chunks whose range holds units ``0 .. num_units - 1``."""
    return ceil_div(num_units * unit_bytes, chunk_bytes)


def unit_spans(index: int, unit_bytes: int, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """The pieces of unit ``index`` in its pool's chunks.

    Returns:
        ``(chunk_position, start, end)`` for each chunk the unit touches, in address
        order: ``chunk_position`` indexes the pool's ordered chunk list and
        ``start:end`` are byte offsets inside that chunk.
    """
    begin = index * unit_bytes
    end = begin + unit_bytes
    spans: list[tuple[int, int, int]] = []
    while begin < end:
        position, offset = divmod(begin, chunk_bytes)
        stop = min(chunk_bytes, offset + end - begin)
        spans.append((position, offset, stop))
        begin += stop - offset
    return spans


class ChunkReserve:
    """Physical chunks that no pool owns yet, lowest id first.

    Every chunk starts here; a pool that runs short takes from the front, so the same
    call sequence maps the same chunk ids. Chunks never come back: a chunk leaves a pool
    only by migrating straight to the other pool.
    """

    __slots__ = ("_chunks",)

    def __init__(self, num_chunks: int) -> None:
        self._chunks: list[int] = list(range(num_chunks))

    def __len__(self) -> int:
        return len(self._chunks)

    def take(self, num_chunks: int) -> list[int]:
        """Remove and return the ``num_chunks`` lowest reserve chunks."""
        if num_chunks > len(self._chunks):
            raise ValueError(f"reserve holds {len(self._chunks)} chunks, asked for {num_chunks}")
        taken = self._chunks[:num_chunks]
        del self._chunks[:num_chunks]
        return taken

    def give_back(self, chunk_ids: list[int]) -> None:
        """Return chunks taken by `take` whose mapping then failed, keeping lowest first."""
        self._chunks = sorted(self._chunks + chunk_ids)

    @property
    def chunk_ids(self) -> list[int]:
        """A copy of the reserve, lowest first."""
        return list(self._chunks)
