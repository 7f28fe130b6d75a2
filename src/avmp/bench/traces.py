"""Trace files: JSONL, the Azure LLM inference trace CSV, BurstGPT CSV, and Mooncake.

Every reader returns requests in arrival order with times in seconds from the first
arrival. A malformed line, a missing column or an empty trace raises `TraceError`
naming the file and the line, so a user can fix the file.

Part of a trace (`TraceWindow`: a window of arrival seconds, the first N requests) is
taken while reading: only the requests taken become `RequestSpec`s, so a huge trace's part
costs no more memory than the trace's own rows.

A file named ``.gz``, ``.bz2`` or ``.xz`` is read through its decompressor (`COMPRESSED`),
its format guessed from the name inside (``trace.jsonl.gz`` is JSONL) and its content as
for a plain file; errors name the compressed file and the line within it, and an
archive that is corrupt or cut short is one `TraceError`.

Formats:
- ``jsonl``: one object per line with ``arrival_s``, ``prompt_tokens``, ``output_tokens``
  (blank lines skipped), and optionally what the prompt is made of, for prefix caching:
  ``segments``, a list of ``[content id, tokens]`` pairs in order that sum to
  ``prompt_tokens`` (the same id, a string or an integer, means the same tokens: a
  system prompt, a conversation's history), and ``output_segment``, the id under which
  a later prompt names this request's output (`avmp.sched.request.RequestSpec`).
- ``azure``: Azure LLM inference trace 2023/2024, header ``TIMESTAMP,ContextTokens,
  GeneratedTokens``; TIMESTAMP is a datetime (``2023-11-16 18:15:46.6805900``; digits
  beyond microseconds are dropped). Rows with 0 generated tokens are skipped, as
  BurstGPT's.
- ``burstgpt``: BurstGPT, header ``Timestamp,Model,Request tokens,Response tokens,
  Total tokens,Log Type``; Timestamp is seconds. Rows with 0 response tokens (failed
  requests in the trace) are skipped, as no output can be replayed for them.
- ``mooncake``: the Mooncake (Kimi, FAST'25) traces, also read by SGLang's and vLLM's
  benchmarks: one object per line with ``timestamp`` (milliseconds), ``input_length``,
  ``output_length`` and optionally ``hash_ids``, one id per `MOONCAKE_BLOCK_TOKENS`-token
  block of the prompt, the last block the remainder; ids are chained hashes, so the same
  id at the same place means the same tokens and the same prefix. Each id becomes a
  segment: a whole block under the id itself, a partial last block under ``(id, tokens)``,
  so one content id never names two lengths and a partial block shares only with the
  same partial block. A list longer than the prompt needs is cut to the blocks the prompt
  has (each id names its prefix, so the first ones still hold); one too short to cover
  the prompt is followed by a segment of this line's own, ``("unhashed", line)``, that
  shares nothing. No ``hash_ids`` (or an empty list): no segments. Lines with 0 output
  tokens are skipped, as BurstGPT's.
"""

from __future__ import annotations

import bisect
import bz2
import csv
import gzip
import json
import lzma
import math
import re
import zlib
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from avmp.sched.request import RequestSpec, Segment

FORMATS = ("jsonl", "azure", "burstgpt", "mooncake")

MOONCAKE_BLOCK_TOKENS = 512
"""Prompt tokens per Mooncake hash id (the traces' block size)."""


class TraceError(ValueError):
    """A trace file that cannot be read: the message names the file and line."""


COMPRESSED: dict[str, Callable[..., IO[Any]]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
}
"""The decompressor of each compressed suffix (the standard library's)."""

_ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
"""What the decompressors raise on a corrupt or truncated archive (gzip's BadGzipFile
and bz2's "Invalid data stream" are OSErrors without an errno; a cut-off stream is an
EOFError)."""


def _open_text(path: Path, newline: str | None = None) -> IO[str]:
    """``path`` as UTF-8 text, decompressed on the fly when its suffix is in `COMPRESSED`."""
    opener = COMPRESSED.get(path.suffix)
    if opener is None:
        return path.open(encoding="utf-8", newline=newline)
    text: IO[str] = opener(path, "rt", encoding="utf-8", newline=newline)
    return text


def _inner_name(path: Path) -> Path:
    """The name of what a compressed file holds (``trace.jsonl`` of ``trace.jsonl.gz``)."""
    return path.with_suffix("") if path.suffix in COMPRESSED else path


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what reading a file can raise besides its lines' own errors into one
    `TraceError` naming the file: not UTF-8, unreadable CSV, a broken archive."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise TraceError(
            f"{path}: not a UTF-8 text file ({error.reason}); expected {', '.join(FORMATS)}"
        ) from None
    except csv.Error as error:
        raise TraceError(f"{path}: unreadable CSV: {error}") from None
    except _ARCHIVE_ERRORS as error:
        if path.suffix not in COMPRESSED or getattr(error, "errno", None) is not None:
            raise  # a plain file's, or the system's (permissions): not the archive's
        raise TraceError(
            f"{path}: corrupt or truncated {path.suffix[1:]} archive: {error}"
        ) from None


def _tokens(value: object, what: str) -> int:
    """A token count: a whole number >= 0, written as a number or as digits (JSON
    ``true`` is not 1 token; ``Infinity`` and ``NaN`` are no count at all)."""
    number: int | None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str | float) and not isinstance(value, bool):
        number = _whole_number(value)
    else:
        number = None
    if number is None or number < 0:
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}")
    return number


def _whole_number(value: str | float) -> int | None:
    """``value`` as an int if it is one exactly (``"12"``, ``12.0``), else None."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return int(number) if math.isfinite(number) and number == int(number) else None


def _seconds(value: object, what: str = "arrival time", unit: str = "seconds") -> float:
    """A finite time in ``unit`` (a NaN arrival would stall the simulated clock)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what} must be a number of {unit}, got {value!r}")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{what} must be a number of {unit}, got {value!r}") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return seconds


_JSONL_FIELDS = ("arrival_s", "prompt_tokens", "output_tokens")
_MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


def _arrival_s(value: object) -> float:
    return _seconds(value, "arrival_s")


def _mooncake_time(value: object) -> float:
    """A Mooncake ``timestamp``, milliseconds from the trace's start, in seconds."""
    milliseconds = _seconds(value, "timestamp", "milliseconds")
    if milliseconds < 0:
        raise ValueError(f"timestamp must be >= 0 milliseconds, got {value!r}")
    return milliseconds / 1000


def _jsonl_rows(
    path: Path, fields: tuple[str, str, str], parse_time: Callable[[object], float]
) -> Iterator[tuple[int, float, int, int]]:
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object with {', '.join(fields)}")
                yield (
                    line_no,
                    parse_time(row[fields[0]]),
                    _tokens(row[fields[1]], fields[1]),
                    _tokens(row[fields[2]], fields[2]),
                )
            except KeyError as error:
                raise TraceError(f"{path}:{line_no}: missing field {error.args[0]!r}") from None
            except ValueError as error:
                raise TraceError(f"{path}:{line_no}: {error}") from None


_FRACTION = re.compile(r"(\.\d{6})\d+")
_EPOCH = datetime(1970, 1, 1)


def _parse_datetime(text: str) -> float:
    """Seconds since the epoch of an Azure TIMESTAMP (nanosecond digits truncated)."""
    text = text.strip()
    digits = _FRACTION.search(text)
    if digits is not None:
        text = text[: digits.end(1)] + text[digits.end() :]
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:  # naive: read as UTC, no DST jumps
        return (moment - _EPOCH).total_seconds()  # what .timestamp() of it in UTC does
    return moment.timestamp()


def _csv_rows(
    path: Path, columns: tuple[str, str, str], parse_time: Callable[[str], float]
) -> Iterator[tuple[int, float, int, int]]:
    """Each row's (line, time, prompt, output). Rows are read as lists, cells by their
    column's index (a repeated header name: its last column, as a dict of the row
    would hold), for a million-row trace reads in seconds."""
    with _open_text(path, newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(
                f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})"
            )
        where = [len(header) - 1 - header[::-1].index(c) for c in columns]
        time_at, prompt_at, output_at = where
        prompt_name, output_name = columns[1:]
        for row in reader:
            if not row:
                continue  # a blank line
            try:
                parsed = (
                    reader.line_num,
                    parse_time(row[time_at]),
                    _cell_tokens(row[prompt_at], prompt_name),
                    _cell_tokens(row[output_at], output_name),
                )
            except (ValueError, IndexError) as error:
                problem = _empty_cell(row, where, columns) or error
                raise TraceError(f"{path}:{reader.line_num}: {problem}") from None
            yield parsed


def _cell_tokens(text: str, what: str) -> int:
    """`_tokens` of a CSV cell, its common case (plain digits) first."""
    try:
        number = int(text)
    except ValueError:
        return _tokens(text, what)
    return number if number >= 0 else _tokens(text, what)


def _empty_cell(row: list[str], where: list[int], columns: tuple[str, ...]) -> str | None:
    """What is wrong with a row that lacks a cell or leaves one blank (None: nothing)."""
    for index, column in zip(where, columns, strict=True):
        if index >= len(row) or not row[index].strip():
            return f"no value in column {column}"
    return None


def _burstgpt_time(text: str) -> float:
    return _seconds(text, "Timestamp")


def _rows(path: Path, fmt: str) -> Iterator[tuple[int, float, int, int]]:
    if fmt == "jsonl":
        return _jsonl_rows(path, _JSONL_FIELDS, _arrival_s)
    if fmt == "mooncake":
        return _jsonl_rows(path, _MOONCAKE_FIELDS, _mooncake_time)
    if fmt == "azure":
        return _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), _parse_datetime)
    return _csv_rows(path, ("Timestamp", "Request tokens", "Response tokens"), _burstgpt_time)


def guess_format(path: Path) -> str:
    """``mooncake`` when the first non-blank line is a JSON object with ``input_length``
    and ``output_length`` (and no ``prompt_tokens``), else ``jsonl`` for .jsonl/.json
    (inside a compressed file: ``.jsonl.gz``), else the CSV flavour named by the header.

    Raises:
        TraceError: none of these, or a file that is not UTF-8 text or a broken archive.
    """
    with _reading(path):
        first = _first_non_blank_line(path)
        if _is_mooncake_line(first):
            return "mooncake"
        if _inner_name(path).suffix in (".jsonl", ".json"):
            return "jsonl"
        with _open_text(path) as handle:
            header = handle.readline()
    if "ContextTokens" in header:
        return "azure"
    if "Request tokens" in header:
        return "burstgpt"
    raise TraceError(f"{path}:1: cannot tell the trace format from its header; pass --format")


def _first_non_blank_line(path: Path) -> str:
    with _open_text(path) as handle:
        return next((line for line in handle if line.strip()), "")


def _is_mooncake_line(line: str) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return (
        isinstance(row, dict)
        and "input_length" in row
        and "output_length" in row
        and "prompt_tokens" not in row
    )


@dataclass(frozen=True)
class TraceWindow:
    """Which part of a trace to take: the requests arriving in ``[start_s, start_s +
    duration_s)`` seconds from its first arrival (``duration_s`` None: to its end), then
    the first ``max_requests`` of them by arrival (None: all). The requests taken arrive
    from 0, as a whole trace's do, and keep their ids (their places in the whole trace
    by arrival).

    Raises:
        ValueError: a negative or non-finite start, a duration not above 0, or fewer
            than 1 request.
    """

    start_s: float = 0.0
    duration_s: float | None = None
    max_requests: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"the window's start must be >= 0 seconds, got {self.start_s}")
        if self.duration_s is not None and not (
            math.isfinite(self.duration_s) and self.duration_s > 0
        ):
            raise ValueError(f"the window's duration must be > 0 seconds, got {self.duration_s}")
        if self.max_requests is not None and (
            isinstance(self.max_requests, bool)
            or not isinstance(self.max_requests, int)
            or self.max_requests < 1
        ):
            raise ValueError(f"max_requests must be a whole number >= 1, got {self.max_requests!r}")

    @property
    def is_whole(self) -> bool:
        """Whether it takes every request of any trace."""
        return self.start_s == 0 and self.duration_s is None and self.max_requests is None

    def bounds(self, arrivals: list[float]) -> tuple[int, int]:
        """The range ``[first, end)`` of ``arrivals`` (seconds from the first arrival,
        sorted) that it takes."""
        first = bisect.bisect_left(arrivals, self.start_s) if self.start_s else 0
        end = len(arrivals)
        if self.duration_s is not None:
            end = bisect.bisect_left(arrivals, self.start_s + self.duration_s, lo=first)
        if self.max_requests is not None:
            end = min(end, first + self.max_requests)
        return first, end

    def describe_span(self) -> str:
        """The window's arrival seconds in words: ``from 60 s to 120 s``."""
        end = "the end" if self.duration_s is None else f"{self.start_s + self.duration_s:g} s"
        return f"from {self.start_s:g} s to {end}"


@dataclass(frozen=True)
class TracePart:
    """The requests a `TraceWindow` took of a trace, and how many the trace holds and
    over how many seconds their arrivals spread (to say what was taken)."""

    requests: list[RequestSpec]
    num_trace_requests: int
    trace_span_s: float


def read_trace(path: str | Path, fmt: str | None = None) -> list[RequestSpec]:
    """Read a trace file into requests sorted by arrival, times from the first arrival.

    Raises:
        TraceError: unknown format, not a UTF-8 text file, a corrupt or truncated
            archive, malformed line, missing column, a non-finite time, or no requests.
        FileNotFoundError: no such file.
    """
    return read_trace_part(path, fmt).requests


def read_trace_part(
    path: str | Path, fmt: str | None = None, window: TraceWindow | None = None
) -> TracePart:
    """Read the part of a trace file that ``window`` takes (None: all of it), as
    `read_trace` reads a whole one; the content of prompts (segments) is read for the
    requests taken only.

    Raises:
        TraceError: as `read_trace`, or a window that takes no request.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.is_dir():
        raise TraceError(f"{path}: is a directory, not a trace file")
    if not path.is_file():
        raise FileNotFoundError(f"no such trace file: {path}")
    with _reading(path):
        fmt = fmt or guess_format(path)
        rows = _read_rows(path, fmt)
        rows.sort()
        start = rows[0][0]
        span_s = rows[-1][0] - start
        if not math.isfinite(span_s):
            raise TraceError(f"{path}: arrival times span more seconds than a float holds")
        first, end = 0, len(rows)
        if window is not None and not window.is_whole:
            first, end = window.bounds([row[0] - start for row in rows])
            if first == end:
                raise TraceError(
                    f"{path}: no request arrives {window.describe_span()} (its "
                    f"{len(rows)} requests arrive from 0 s to {span_s:g} s)"
                )
        taken = rows[first:end]
        content = _content(path, fmt, {row[1] for row in taken} if len(taken) < len(rows) else None)
    return TracePart(_requests(path, taken, first, content), len(rows), span_s)


def _requests(
    path: Path, rows: list[tuple[float, int, int, int]], first_id: int, content: dict[int, _Content]
) -> list[RequestSpec]:
    """``rows`` (sorted) as requests, ids from ``first_id``, times from the first row's."""
    start = rows[0][0]
    requests = []
    for i, (arrival, line_no, prompt, output) in enumerate(rows, start=first_id):
        segments, output_segment = content.get(line_no, ((), None))
        try:
            requests.append(
                RequestSpec(i, arrival - start, prompt, output, segments, output_segment)
            )
        except ValueError as error:
            raise TraceError(f"{path}:{line_no}: {error}") from None
    return requests


_CONTENT_ID = (str, int)

_Content = tuple[tuple[Segment, ...], Hashable | None]
"""A line's ``segments`` and ``output_segment``."""


def _content(path: Path, fmt: str, lines: set[int] | None = None) -> dict[int, _Content]:
    """By line: what the prompts of a file that names them are made of (none for CSV),
    of the ``lines`` given (None: every line)."""
    if fmt == "jsonl":
        return _jsonl_content(path, lines)
    if fmt == "mooncake":
        return _mooncake_content(path, lines)
    return {}


def _content_id(value: object, field: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, _CONTENT_ID):
        raise ValueError(f"{field}: a content id is a string or an integer, got {value!r}")
    return value


def _json_objects(path: Path, lines: set[int] | None) -> Iterator[tuple[int, dict[str, object]]]:
    """Each non-blank line of a file `_jsonl_rows` has read, as its object (of the
    ``lines`` given; None: all)."""
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if (lines is None or line_no in lines) and line.strip():
                yield line_no, json.loads(line)


def _jsonl_content(path: Path, lines: set[int] | None) -> dict[int, _Content]:
    """By line: the ``segments`` and ``output_segment`` of the lines that give them."""
    content: dict[int, _Content] = {}
    for line_no, row in _json_objects(path, lines):
        if "segments" not in row and "output_segment" not in row:
            continue
        try:
            content[line_no] = (_segments(row.get("segments", [])), _output_id(row))
        except ValueError as error:
            raise TraceError(f"{path}:{line_no}: {error}") from None
    return content


def _mooncake_content(path: Path, lines: set[int] | None) -> dict[int, _Content]:
    """By line: the segments of the lines with hash ids."""
    content: dict[int, _Content] = {}
    for line_no, row in _json_objects(path, lines):
        try:
            prompt = _tokens(row["input_length"], "input_length")
            segments = _block_segments(row.get("hash_ids"), prompt, line_no)
        except ValueError as error:
            raise TraceError(f"{path}:{line_no}: {error}") from None
        if segments:
            content[line_no] = (segments, None)
    return content


def _block_segments(hash_ids: object, prompt_tokens: int, line_no: int) -> tuple[Segment, ...]:
    """A Mooncake prompt as segments, one per hash id, by the rule in the module
    docstring: whole blocks by their id, a partial last block by ``(id, tokens)``, ids
    past the prompt's end dropped, tokens past the ids' end this line's own."""
    if hash_ids is None:
        return ()
    if not isinstance(hash_ids, list):
        raise ValueError(f"hash_ids: a list of integers, got {hash_ids!r}")
    block = MOONCAKE_BLOCK_TOKENS
    ids = [_hash_id(value) for value in hash_ids][: -(-prompt_tokens // block)]
    segments: list[Segment] = []
    for index, hash_id in enumerate(ids):
        tokens = min(block, prompt_tokens - index * block)
        segments.append((hash_id if tokens == block else (hash_id, tokens), tokens))
    unhashed = prompt_tokens - block * len(ids)
    if ids and unhashed > 0:
        segments.append((("unhashed", line_no), unhashed))
    return tuple(segments)


def _hash_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"hash_ids: each id is an integer, got {value!r}")
    return value


def _segments(value: object) -> tuple[Segment, ...]:
    if not isinstance(value, list):
        raise ValueError("segments: a list of [content id, tokens] pairs")
    pieces: list[Segment] = []
    for piece in value:
        if not isinstance(piece, list) or len(piece) != 2:
            raise ValueError(f"segments: each piece is [content id, tokens], got {piece!r}")
        pieces.append((_content_id(piece[0], "segments"), _tokens(piece[1], "segments")))
    return tuple(pieces)


def _output_id(row: dict[str, object]) -> str | int | None:
    value = row.get("output_segment")
    return None if value is None else _content_id(value, "output_segment")


def _read_rows(path: Path, fmt: str) -> list[tuple[float, int, int, int]]:
    """(arrival, line, prompt, output) of every request of the file, in file order."""
    if fmt not in FORMATS:
        raise TraceError(f"{path}: unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    rows = []
    for line_no, arrival, prompt, output in _rows(path, fmt):
        if fmt != "jsonl" and output == 0:
            continue  # nothing to replay: a failed or cancelled request in the trace
        if prompt < 1 or output < 1:
            raise TraceError(f"{path}:{line_no}: prompt and output tokens must be >= 1")
        rows.append((arrival, line_no, prompt, output))
    if not rows:
        raise TraceError(f"{path}: empty trace (no requests)")
    return rows


def write_jsonl(requests: list[RequestSpec], path: str | Path) -> None:
    """Write requests as a JSONL trace (the format `read_trace` reads back), compressed
    when the name ends in a `COMPRESSED` suffix."""
    path = Path(path)
    opener = COMPRESSED.get(path.suffix)
    with path.open("w") if opener is None else opener(path, "wt") as handle:
        for r in requests:
            handle.write(json.dumps(_jsonl_row(r)) + "\n")


def _jsonl_row(r: RequestSpec) -> dict[str, object]:
    """A request as a JSONL line, with its content when it has any."""
    row: dict[str, object] = {
        "arrival_s": r.arrival_s,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
    }
    if r.segments:
        row["segments"] = [[_json_id(i), n] for i, n in r.segments]
    if r.output_segment is not None:
        row["output_segment"] = _json_id(r.output_segment)
    return row


def _json_id(value: object) -> str | int:
    """A content id as a file holds it: strings and integers as they are, anything else
    (the workloads' tuples) as its JSON text, the same text for the same id."""
    if isinstance(value, _CONTENT_ID) and not isinstance(value, bool):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)
