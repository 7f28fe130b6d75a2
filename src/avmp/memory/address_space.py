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
    """Physical chunks that no pool owns yet: always the ids ``first .. num_chunks - 1``.

    Every chunk starts here; a pool that runs short takes from the front, so the same
    call sequence maps the same chunk ids. Chunks never come back (a chunk leaves a pool
    only by migrating straight to the other pool) except those just taken whose mapping
    failed, which go back to the front. So the reserve stays one range and is kept as
    two integers: a budget of any size costs nothing until its chunks are used.
    """

    __slots__ = ("_first", "_end")

    def __init__(self, num_chunks: int) -> None:
        self._first = 0
        self._end = num_chunks

    def __len__(self) -> int:
        return self._end - self._first

    def take(self, num_chunks: int) -> list[int]:
        """Remove and return the ``num_chunks`` lowest reserve chunks."""
        if not 0 <= num_chunks <= self._end - self._first:  # not len(self): a Python call
            raise ValueError(f"reserve holds {len(self)} chunks, asked for {num_chunks}")
        taken = list(range(self._first, self._first + num_chunks))
        self._first += num_chunks
        return taken

    def give_back(self, chunk_ids: list[int]) -> None:
        """Return the chunks of the last `take`, whose mapping then failed."""
        if chunk_ids != list(range(self._first - len(chunk_ids), self._first)):
            raise ValueError(f"chunks {chunk_ids} are not the last ones taken")
        self._first -= len(chunk_ids)

    @property
    def chunk_ids(self) -> list[int]:
        """The reserve's ids, lowest first (a new list: for checks and reports)."""
        return list(range(self._first, self._end))
