"""Trace files: when each request arrives and how many prompt and output tokens it has.

Every reader returns requests in arrival order with times in seconds from the first
arrival. A malformed line, a missing column or an empty trace raises `TraceError`
naming the file and the line (in a JSON array, the line where the element starts and its
index, from 0), so a user can fix the file. `TraceColumns` says how a file was read:
which column gave each quantity and in which unit.

Part of a trace (`TraceWindow`: a window of arrival seconds, the first N requests) is
taken while reading: only the requests taken become `RequestSpec`s, so a huge trace's part
costs no more memory than the trace's own rows.

A file named ``.gz``, ``.bz2`` or ``.xz`` is read through its decompressor (`COMPRESSED`),
its format guessed from the name inside (``trace.jsonl.gz`` is JSONL) and its content as
for a plain file; errors name the compressed file and the line within it, and an
archive that is corrupt or cut short is one `TraceError`. Text is UTF-8, with or without
the byte-order mark that spreadsheets write.

Formats (`guess_format` tells them apart; ``--format`` names one):
- ``jsonl``: JSON objects, one per line (blank lines skipped), or in a file not named
  ``.jsonl`` whose first non-blank character is ``[``, one JSON array of them (read whole
  into memory). Each has ``arrival_s``, ``prompt_tokens``, ``output_tokens``, or other
  names of them (`COLUMN_NAMES`, found in the first object, ours first), and optionally
  what the prompt is made of, for prefix caching: ``segments``, a list of ``[content id,
  tokens]`` pairs in order that sum to the prompt tokens (the same id, a string or an
  integer, means the same tokens: a system prompt, a conversation's history), and
  ``output_segment``, the id under which a later prompt names this request's output
  (`avmp.sched.request.RequestSpec`). 0 output tokens is an error, as in a file we wrote.
- ``csv``: any CSV, or TSV (tabs and no comma in the header line), whose header names the
  quantities by `COLUMN_NAMES`; other columns are ignored. Rows with 0 output tokens are
  skipped (failed requests in a log), and counted in `TraceColumns`.
- ``azure``: Azure LLM inference trace 2023/2024, header ``TIMESTAMP,ContextTokens,
  GeneratedTokens``; TIMESTAMP is a datetime (``2023-11-16 18:15:46.6805900``; digits
  beyond microseconds are dropped). Rows with 0 generated tokens are skipped, as
  BurstGPT's.
- ``burstgpt``: BurstGPT, header ``Timestamp,Model,Request tokens,Response tokens,
  Total tokens,Log Type``; Timestamp is seconds. Rows with 0 response tokens (failed
  requests in the trace) are skipped, as no output can be replayed for them.
- ``mooncake``: the Mooncake (Kimi, FAST'25) traces, also read by SGLang's and vLLM's
  benchmarks: one object per line (or one array of them, as ``jsonl``) with ``timestamp``
  (milliseconds), ``input_length``, ``output_length`` and optionally ``hash_ids``, one id
  per `MOONCAKE_BLOCK_TOKENS`-token block of the prompt, the last block the remainder; ids
  are chained hashes, so the same id at the same place means the same tokens and the same
  prefix. Each id becomes a segment: a whole block under the id itself, a partial last
  block under ``(id, tokens)``, so one content id never names two lengths and a partial
  block shares only with the same partial block. A list longer than the prompt needs is
  cut to the blocks the prompt has (each id names its prefix, so the first ones still
  hold); one too short to cover the prompt is followed by a segment of this line's own,
  ``("unhashed", line)`` (in an array: its index), that shares nothing. No ``hash_ids``
  (or an empty list): no segments. Lines with 0 output tokens are skipped, as BurstGPT's.

Names and units, where a file's columns (or its first object's fields) are found by name:
- A name matches in any case, spaces, hyphens and underscores alike (``Input Tokens``,
  ``input-tokens``, ``inputTokens``). Where several name one quantity, the earliest in
  `COLUMN_NAMES` is read (of the times: ``arrival_s``, then a name that gives its unit,
  then the others), and `TraceColumns` names the rest.
- An arrival time's name may give its unit: ``arrival_s``, ``timestamp_ms``, ``time
  (us)``, ``ts_ns``. A name without one holds ISO 8601 dates and times where its first
  value is not a number (read as Azure's), else numbers in ``time_unit``
  (``--time-unit``), seconds by default; a ``time_unit`` that contradicts a name, or is
  given for dates, is an error. BurstGPT's seconds and Mooncake's milliseconds are the
  default that ``time_unit`` overrides; Azure's dates take none.
- No arrival time at all (a list of prompt and output lengths): every request arrives at
  0, all at once, and `TraceColumns` says so.
"""

from __future__ import annotations

import bisect
import bz2
import csv
import dataclasses
import gzip
import itertools
import json
import lzma
import math
import re
import zlib
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

from avmp.sched.request import RequestSpec, Segment

FORMATS = ("jsonl", "azure", "burstgpt", "mooncake", "csv")

MOONCAKE_BLOCK_TOKENS = 512
"""Prompt tokens per Mooncake hash id (the traces' block size)."""

TIME_UNITS: dict[str, int] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
"""The units of numeric times (``--time-unit``, the end of a time column's name), each
with how many of it make a second."""

COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "arrival time": ("arrival_s", "arrival_time", "arrival", "timestamp", "time", "ts"),
    "prompt tokens": (
        "prompt_tokens", "input_tokens", "input_len", "input_length", "prompt_len",
        "prompt_length", "context_tokens", "num_prompt_tokens",
    ),
    "output tokens": (
        "output_tokens", "output_len", "output_length", "completion_tokens",
        "generated_tokens", "response_tokens", "max_tokens",
    ),
}  # fmt: skip
"""The names under which a trace's columns (or JSON fields) give each quantity, ours
first, the one read first where several are present; any time name may also end in a
unit of `TIME_UNITS` (``timestamp_ms``, ``time (us)``)."""


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

_ENCODING = "utf-8-sig"  # UTF-8, less the byte-order mark a spreadsheet's export begins with


def _open_text(path: Path, newline: str | None = None) -> IO[str]:
    """``path`` as UTF-8 text, decompressed on the fly when its suffix is in `COMPRESSED`."""
    opener = COMPRESSED.get(path.suffix)
    if opener is None:
        return path.open(encoding=_ENCODING, newline=newline)
    text: IO[str] = opener(path, "rt", encoding=_ENCODING, newline=newline)
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


# -- names and units ---------------------------------------------------------------------

_QUANTITIES = ("arrival", "prompt", "output")
_QUANTITY_WORDS = dict(zip(_QUANTITIES, COLUMN_NAMES, strict=True))
_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
_SEPARATORS = str.maketrans("", "", " _-")
_UNIT_END = re.compile(r"(.+?)[ _-]+(s|ms|us|ns)")
"""A name ending in a unit: ``timestamp_ms``; ``time (us)`` once its brackets are spaces."""


def _name_key(name: str) -> str:
    """A column name as names are matched: lower case, no spaces, hyphens or underscores."""
    return name.strip().lower().translate(_SEPARATORS)


_TOKEN_RANKS = {
    _name_key(name): (quantity, rank)
    for quantity, names in zip(_QUANTITIES[1:], list(COLUMN_NAMES.values())[1:], strict=True)
    for rank, name in enumerate(names)
}
_TIME_RANKS = {_name_key(name): rank for rank, name in enumerate(COLUMN_NAMES["arrival time"][1:])}
"""The time names less ``arrival_s``, which is ``arrival`` in seconds."""


def _meaning(name: str) -> tuple[str, int, str | None] | None:
    """What a column name stands for: its quantity, its rank among the names of that
    quantity (the lowest is read), and the unit it gives its times in; None: nothing."""
    key = _name_key(name)
    if key in _TOKEN_RANKS:
        quantity, rank = _TOKEN_RANKS[key]
        return quantity, rank, None
    if key in _TIME_RANKS:  # after arrival_s (0) and the names that give a unit (1-5)
        return "arrival", 10 + _TIME_RANKS[key], None
    unit_end = _UNIT_END.fullmatch(re.sub(r"[()\[\]]", " ", name).strip().lower())
    if unit_end is None or _name_key(unit_end[1]) not in _TIME_RANKS:
        return None
    base, unit = _name_key(unit_end[1]), unit_end[2]
    return "arrival", 0 if (base, unit) == ("arrival", "s") else 1 + _TIME_RANKS[base], unit


class _Column(NamedTuple):
    at: int  # its index in the header
    name: str
    unit: str | None  # the unit its name gives its times in


def _find_columns(names: Sequence[str]) -> tuple[dict[str, _Column], tuple[str, ...]]:
    """By quantity, the column of ``names`` read for it (the lowest rank; of equal ones
    the last, as a dict of the row would hold), and the other names that name one."""
    best: dict[str, tuple[int, _Column]] = {}
    naming = []
    for index, name in enumerate(names):
        meaning = _meaning(name)
        if meaning is None:
            continue
        quantity, rank, unit = meaning
        naming.append(index)
        if quantity not in best or rank <= best[quantity][0]:
            best[quantity] = (rank, _Column(index, name, unit))
    found = {quantity: column for quantity, (_, column) in best.items()}
    read = {column.at for column in found.values()}
    return found, tuple(names[i] for i in naming if i not in read)


def _accepted_names() -> str:
    """Every name of every quantity, in one line, for the errors that list them."""
    lists = "; ".join(f"{word} {', '.join(names)}" for word, names in COLUMN_NAMES.items())
    return (
        f"{lists} (any case, spaces, hyphens and underscores alike; a time name may end in "
        f"its unit, {', '.join('_' + unit for unit in TIME_UNITS)}; no time column: all "
        "arrive at 0)"
    )


def _missing_tokens(found: dict[str, _Column], kind: str, own: tuple[str, ...]) -> str | None:
    """What names found in a header (``kind`` "column") or a first object ("field") lack:
    the prompt or the output tokens (None: neither is missing); ``own`` are the names
    the format itself gives the three quantities."""
    missing = [q for q in _QUANTITIES[1:] if q not in found]
    if not missing:
        return None
    if not found:
        return f"no {kind} names the prompt or output tokens; the names: {_accepted_names()}"
    return "; ".join(
        f"missing {kind} {own[_QUANTITIES.index(q)]!r} (nor another name of the "
        f"{_QUANTITY_WORDS[q]}: {', '.join(COLUMN_NAMES[_QUANTITY_WORDS[q]][1:])})"
        for q in missing
    )


def _is_date(value: object) -> bool:
    """Whether a time's first value is a date rather than a number: text, not blank, that
    does not read as a number (``"1.5"`` does)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


def _time_in(unit: str, what: str) -> Callable[[object], float]:
    """How to read numeric times in ``unit`` as seconds (``what``: the column, for errors)."""
    per_second, word = TIME_UNITS[unit], _UNIT_WORDS[unit]

    def seconds(value: object) -> float:
        if type(value) is str:  # a CSV cell, every row of one: its common case first
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number / per_second
        return _seconds(value, what, word) / per_second

    return seconds


def _date_seconds(value: object, what: str) -> float:
    """An ISO 8601 date and time, as `_parse_datetime` reads Azure's, in seconds."""
    if isinstance(value, str):
        try:
            return _parse_datetime(value)
        except ValueError:
            pass
    raise ValueError(f"{what} must be an ISO 8601 date and time, as its first row's, got {value!r}")


class _TimeReading(NamedTuple):
    parse: Callable[[Any], float]
    unit: str  # a `TIME_UNITS` key, or "date"
    unit_from: str  # in words, for `TraceColumns.describe`


def _time_reading(
    column: _Column, first_value: object, time_unit: str | None, at: str, kind: str = "column"
) -> _TimeReading:
    """How to read a time column found by name: in the unit its name gives (which
    ``time_unit`` must not contradict), else as dates and times where its first value is
    no number (``time_unit`` must be None), else in ``time_unit``, seconds by default.

    Raises:
        TraceError: ``at`` (the file and line) and the contradiction.
    """
    name = column.name
    if column.unit is not None:
        if time_unit not in (None, column.unit):
            raise TraceError(
                f"{at}: {kind} {name!r} gives its times in {_UNIT_WORDS[column.unit]}; "
                f"--time-unit {time_unit} contradicts it"
            )
        return _TimeReading(_time_in(column.unit, name), column.unit, "as its name says")
    if _is_date(first_value):
        if time_unit is not None:
            raise TraceError(
                f"{at}: {kind} {name!r} holds dates and times ({first_value!r}), not numbers "
                f"of a unit: --time-unit does not apply"
            )
        return _TimeReading(lambda value: _date_seconds(value, name), "date", "")
    if time_unit is not None:
        return _TimeReading(_time_in(time_unit, name), time_unit, "--time-unit")
    default = "the default where a name gives no unit; --time-unit to change it"
    return _TimeReading(_time_in("s", name), "s", default)


def _rows_skipped(count: int) -> str:
    return f"{count} row{'' if count == 1 else 's'} with 0 output tokens skipped"


@dataclass(frozen=True)
class TraceColumns:
    """How a trace file was read, so a user sees what was assumed: its shape, the column
    (or JSON field) of each quantity, the unit of its times and where that unit came
    from, the other columns that name a quantity, and the rows skipped.
    ``is_generic``: found by names (`COLUMN_NAMES`) or with a unit that ``--time-unit``
    set, not fixed by a known format; a replay says it all then."""

    shape: str  # "CSV", "TSV", "JSON lines", "a JSON array", "Azure CSV", ...
    arrival: str | None  # None: no arrival times, all arrive at 0
    prompt: str
    output: str
    time_unit: str = "s"  # a `TIME_UNITS` key, or "date": ISO 8601 dates and times
    unit_from: str = "the format's"
    not_read: tuple[str, ...] = ()
    num_skipped: int = 0  # rows with 0 output tokens
    is_generic: bool = False

    def describe(self) -> str:
        """In one line: ``read as CSV: arrival time from 'ts' in milliseconds (...), ...``."""
        if self.arrival is None:
            times = "no arrival times, all requests arrive at 0 s"
        elif self.time_unit == "date":
            times = f"arrival time from {self.arrival!r} as ISO 8601 dates and times"
        else:
            times = (
                f"arrival time from {self.arrival!r} in {_UNIT_WORDS[self.time_unit]} "
                f"({self.unit_from})"
            )
        text = (
            f"read as {self.shape}: {times}, prompt tokens from {self.prompt!r}, "
            f"output tokens from {self.output!r}"
        )
        if self.not_read:
            text += f"; not read: {', '.join(map(repr, self.not_read))}"
        if self.num_skipped:
            text += f"; {_rows_skipped(self.num_skipped)}"
        return text


# -- reading ------------------------------------------------------------------------------

_Row = tuple[int, float, int, int]
"""A record's key (its line, or its index in a JSON array), arrival, prompt and output."""


@dataclass
class _Source:
    """A trace file being read: its format, whether it holds one JSON array, and where
    each record is, to name it in an error. A line's key is its line; an array element's,
    its index, whose line `element_lines` keeps as the array is first read."""

    path: Path
    fmt: str
    is_array: bool = False
    element_lines: list[int] = field(default_factory=list)
    prompt_field: str = "input_length"  # where a Mooncake object's prompt length is

    def where(self, key: int) -> str:
        """``file:line`` of a record (and ``: element N`` of an array's)."""
        if not self.is_array:
            return f"{self.path}:{key}"
        return f"{self.path}:{self.element_lines[key]}: element {key}"


def _source(path: Path, fmt: str) -> _Source:
    """The file to read as ``fmt``: a JSON array where it is not named ``.jsonl`` and its
    first non-blank character is ``[``."""
    if fmt not in FORMATS:
        raise TraceError(f"{path}: unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    is_array = (
        fmt in ("jsonl", "mooncake")
        and _inner_name(path).suffix != ".jsonl"
        and _first_non_blank_line(path).lstrip().startswith("[")
    )
    return _Source(path, fmt, is_array)


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


_BLANK = re.compile(r"[ \t\n\r]*")


def _after_blanks(text: str, pos: int) -> int:
    """The first position from ``pos`` on that is not JSON whitespace."""
    blanks = _BLANK.match(text, pos)
    return pos if blanks is None else blanks.end()


def _array_elements(text: str) -> Iterator[tuple[int, object]]:
    """Each element of the one JSON array that ``text`` holds, with the line it starts on.

    Raises:
        json.JSONDecodeError: where ``text`` is not one JSON array (its line and column).
    """
    decode = json.JSONDecoder().raw_decode
    pos = _after_blanks(text, 0)
    if not text.startswith("[", pos):
        raise json.JSONDecodeError("Expecting '['", text, pos)
    pos = _after_blanks(text, pos + 1)
    line, counted = 1, 0
    while not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, end = decode(text, pos)
        except json.JSONDecodeError:
            raise
        except ValueError as error:  # an integer of too many digits
            raise json.JSONDecodeError(str(error), text, pos) from None
        yield line, value
        pos = _after_blanks(text, end)
        if text.startswith(",", pos):
            pos = _after_blanks(text, pos + 1)
            if text.startswith("]", pos):
                raise json.JSONDecodeError("Illegal trailing comma before end of array", text, pos)
        elif not text.startswith("]", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    rest = _after_blanks(text, pos + 1)
    if rest < len(text):
        raise json.JSONDecodeError("Extra data", text, rest)


def _json_records(source: _Source) -> Generator[tuple[int, object], None, None]:
    """(key, value) of each record of a JSON trace: each non-blank line's value, or each
    element of its one array."""
    path = source.path
    if not source.is_array:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as error:
                    raise TraceError(f"{path}:{line_no}: {error}") from None
                yield line_no, value
        return
    with _open_text(path) as handle:
        text = handle.read()
    lines = source.element_lines
    try:
        for index, (line_no, value) in enumerate(_array_elements(text)):
            if index == len(lines):
                lines.append(line_no)
            yield index, value
    except json.JSONDecodeError as error:
        raise TraceError(f"{path}:{error.lineno}: {error}") from None


def _json_rows(source: _Source, time_unit: str | None) -> tuple[TraceColumns, Iterator[_Row]]:
    """How a JSON trace is read, and its rows: the format's own fields where its first
    object has them all (or it is no object: its record's error follows in turn), else
    the fields `_find_columns` finds among the first object's."""
    records = _json_records(source)
    try:
        first = next(records, None)
        own = _MOONCAKE_FIELDS if source.fmt == "mooncake" else _JSONL_FIELDS
        value = None if first is None else first[1]
        at = source.where(first[0]) if first is not None else str(source.path)
        if isinstance(value, dict) and not all(name in value for name in own):
            columns, fields, time = _found_fields(source, value, time_unit, at)
        else:
            columns, fields, time = _own_fields(source, time_unit, at)
    except BaseException:
        records.close()
        raise
    source.prompt_field = fields[1]
    rows = records if first is None else itertools.chain((first,), records)
    return columns, _object_rows(source, rows, fields, time)


def _json_shape(source: _Source) -> str:
    kind = "a JSON array" if source.is_array else "JSON lines"
    return f"{kind} (Mooncake)" if source.fmt == "mooncake" else kind


def _own_fields(
    source: _Source, time_unit: str | None, at: str
) -> tuple[TraceColumns, tuple[str, str, str], Callable[[Any], float]]:
    """A JSON format's own fields: ours, whose ``arrival_s`` is seconds by its name, or
    Mooncake's, whose ``timestamp`` is milliseconds unless ``time_unit`` says otherwise."""
    shape = _json_shape(source)
    if source.fmt != "mooncake":
        if time_unit not in (None, "s"):
            raise TraceError(
                f"{at}: field 'arrival_s' gives its times in seconds; --time-unit {time_unit} "
                "contradicts it"
            )
        return TraceColumns(shape, *_JSONL_FIELDS), _JSONL_FIELDS, _arrival_s
    if time_unit in (None, "ms"):
        return TraceColumns(shape, *_MOONCAKE_FIELDS, "ms"), _MOONCAKE_FIELDS, _mooncake_time
    columns = TraceColumns(shape, *_MOONCAKE_FIELDS, time_unit, "--time-unit", is_generic=True)
    return columns, _MOONCAKE_FIELDS, _time_in(time_unit, "timestamp")


def _found_fields(
    source: _Source, first: dict[str, object], time_unit: str | None, at: str
) -> tuple[TraceColumns, tuple[str, str, str], Callable[[Any], float] | None]:
    """The fields of the quantities that the first object's names name (no time: None)."""
    own = _MOONCAKE_FIELDS if source.fmt == "mooncake" else _JSONL_FIELDS
    found, not_read = _find_columns(list(first))
    problem = _missing_tokens(found, "field", own)
    if problem is not None:
        raise TraceError(f"{at}: {problem}")
    prompt, output = found["prompt"].name, found["output"].name
    shape = _json_shape(source)
    time_column = found.get("arrival")
    if time_column is None:
        columns = TraceColumns(shape, None, prompt, output, not_read=not_read, is_generic=True)
        return columns, ("", prompt, output), None
    time = _time_reading(time_column, first[time_column.name], time_unit, at, "field")
    columns = TraceColumns(
        shape, time_column.name, prompt, output, time.unit, time.unit_from, not_read,
        is_generic=True,
    )  # fmt: skip
    return columns, (time_column.name, prompt, output), time.parse


def _object_rows(
    source: _Source,
    records: Iterator[tuple[int, object]],
    fields: tuple[str, str, str],
    parse_time: Callable[[Any], float] | None,
) -> Iterator[_Row]:
    """Each record's row, its quantities under ``fields`` (``parse_time`` None: no time,
    every row arrives at 0)."""
    time_field, prompt_field, output_field = fields
    for key, row in records:
        try:
            if not isinstance(row, dict):
                named = ", ".join(name for name in fields if name)
                raise ValueError(f"expected a JSON object with {named}")
            yield (
                key,
                0.0 if parse_time is None else parse_time(row[time_field]),
                _tokens(row[prompt_field], prompt_field),
                _tokens(row[output_field], output_field),
            )
        except KeyError as error:
            raise TraceError(f"{source.where(key)}: missing field {error.args[0]!r}") from None
        except ValueError as error:
            raise TraceError(f"{source.where(key)}: {error}") from None


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


_KNOWN_COLUMNS = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
}


class _CsvPlan(NamedTuple):
    """Which cells of a row to read, and how: the time's column (``parse_time`` None: no
    time, every row arrives at 0), the prompt's and the output's, each column's index
    and name (for a row that lacks one), and what to tell."""

    time_at: int
    parse_time: Callable[[str], float] | None
    prompt_at: int
    output_at: int
    cells: tuple[tuple[int, str], ...]
    columns: TraceColumns


def _delimiter(header_line: str) -> str:
    """A tab where the header line has tabs and no comma (TSV), else a comma."""
    return "\t" if "\t" in header_line and "," not in header_line else ","


def _header_cells(line: str) -> list[str]:
    return [cell.strip() for cell in next(csv.reader([line], delimiter=_delimiter(line)), [])]


def _csv_rows(source: _Source, time_unit: str | None) -> tuple[TraceColumns, Iterator[_Row]]:
    """How a CSV trace is read (`_CsvPlan`, from its header and, to tell dates from
    numbers, its first row), and its rows."""
    handle = _open_text(source.path, newline="")
    try:
        header_line = handle.readline()
        reader = csv.reader(
            itertools.chain((header_line,), handle), delimiter=_delimiter(header_line)
        )
        header = [h.strip() for h in next(reader, [])]
        rows: Iterator[list[str]] = reader
        if source.fmt == "csv":
            plan, rows = _found_plan(source, header, reader, time_unit)
        else:
            plan = _known_plan(source, header, time_unit)
    except BaseException:
        handle.close()
        raise
    return plan.columns, _csv_loop(source.path, handle, reader, rows, plan)


def _known_plan(source: _Source, header: list[str], time_unit: str | None) -> _CsvPlan:
    """Azure's or BurstGPT's columns, by their names (a repeated one: its last column)."""
    path, fmt = source.path, source.fmt
    columns = _KNOWN_COLUMNS[fmt]
    missing = [c for c in columns if c not in header]
    if missing:
        raise TraceError(
            f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})"
        )
    time_at, prompt_at, output_at = (len(header) - 1 - header[::-1].index(c) for c in columns)
    cells = tuple(zip((time_at, prompt_at, output_at), columns, strict=True))
    if fmt == "azure":
        if time_unit is not None:
            raise TraceError(
                f"{path}:1: the Azure trace's TIMESTAMP holds dates and times, not numbers of "
                "a unit: --time-unit does not apply"
            )
        told = TraceColumns("Azure CSV", *columns, "date")
        return _CsvPlan(time_at, _parse_datetime, prompt_at, output_at, cells, told)
    if time_unit in (None, "s"):
        told = TraceColumns("BurstGPT CSV", *columns)
        return _CsvPlan(time_at, _burstgpt_time, prompt_at, output_at, cells, told)
    told = TraceColumns("BurstGPT CSV", *columns, time_unit, "--time-unit", is_generic=True)
    return _CsvPlan(time_at, _time_in(time_unit, "Timestamp"), prompt_at, output_at, cells, told)


def _found_plan(
    source: _Source, header: list[str], reader: Any, time_unit: str | None
) -> tuple[_CsvPlan, Iterator[list[str]]]:
    """The columns a generic header names, and the rows still to read (the first row,
    read to tell a time column's dates from numbers, put back in front)."""
    path = source.path
    found, not_read = _find_columns(header)
    problem = _missing_tokens(found, "column", _JSONL_FIELDS)
    if problem is not None:
        raise TraceError(f"{path}:1: {problem} (header: {', '.join(header)})")
    prompt, output = found["prompt"], found["output"]
    shape = "TSV" if reader.dialect.delimiter == "\t" else "CSV"
    first = next((row for row in reader if row), None)
    rows = reader if first is None else itertools.chain((first,), reader)
    cells = ((prompt.at, prompt.name), (output.at, output.name))
    time = found.get("arrival")
    if time is None:
        told = TraceColumns(
            shape, None, prompt.name, output.name, not_read=not_read, is_generic=True
        )
        return _CsvPlan(-1, None, prompt.at, output.at, cells, told), rows
    first_value = first[time.at] if first is not None and time.at < len(first) else ""
    at = f"{path}:{1 if time.unit else reader.line_num}"  # its name's unit, or first value
    reading = _time_reading(time, first_value, time_unit, at)
    told = TraceColumns(
        shape, time.name, prompt.name, output.name, reading.unit, reading.unit_from, not_read,
        is_generic=True,
    )  # fmt: skip
    with_time = ((time.at, time.name), *cells)
    return _CsvPlan(time.at, reading.parse, prompt.at, output.at, with_time, told), rows


def _csv_loop(
    path: Path, handle: IO[str], reader: Any, rows: Iterator[list[str]], plan: _CsvPlan
) -> Iterator[_Row]:
    """Each row's (line, time, prompt, output). Rows are read as lists, cells by their
    column's index, for a million-row trace reads in seconds."""
    time_at, parse_time, prompt_at, output_at, cells, _ = plan
    prompt_name, output_name = cells[-2][1], cells[-1][1]
    with handle:
        for row in rows:
            if not row:
                continue  # a blank line
            try:
                parsed = (
                    reader.line_num,
                    0.0 if parse_time is None else parse_time(row[time_at]),
                    _cell_tokens(row[prompt_at], prompt_name),
                    _cell_tokens(row[output_at], output_name),
                )
            except (ValueError, IndexError) as error:
                problem = _empty_cell(row, cells) or error
                raise TraceError(f"{path}:{reader.line_num}: {problem}") from None
            yield parsed


def _cell_tokens(text: str, what: str) -> int:
    """`_tokens` of a CSV cell, its common case (plain digits) first."""
    try:
        number = int(text)
    except ValueError:
        return _tokens(text, what)
    return number if number >= 0 else _tokens(text, what)


def _empty_cell(row: list[str], cells: tuple[tuple[int, str], ...]) -> str | None:
    """What is wrong with a row that lacks a cell or leaves one blank (None: nothing)."""
    for index, column in cells:
        if index >= len(row) or not row[index].strip():
            return f"no value in column {column}"
    return None


def _burstgpt_time(text: str) -> float:
    return _seconds(text, "Timestamp")


def _read_rows(
    source: _Source, time_unit: str | None
) -> tuple[list[tuple[float, int, int, int]], TraceColumns]:
    """(arrival, key, prompt, output) of every request of the file, in file order, and
    how the file was read."""
    read = _json_rows if source.fmt in ("jsonl", "mooncake") else _csv_rows
    columns, records = read(source, time_unit)
    rows = []
    num_skipped = 0
    for key, arrival, prompt, output in records:
        if source.fmt != "jsonl" and output == 0:
            num_skipped += 1
            continue  # nothing to replay: a failed or cancelled request in the trace
        if prompt < 1 or output < 1:
            raise TraceError(f"{source.where(key)}: prompt and output tokens must be >= 1")
        rows.append((arrival, key, prompt, output))
    if not rows:
        skipped = f"; {_rows_skipped(num_skipped)}" if num_skipped else ""
        raise TraceError(f"{source.path}: empty trace (no requests{skipped})")
    return rows, dataclasses.replace(columns, num_skipped=num_skipped)


def guess_format(path: Path) -> str:
    """``mooncake`` when the first non-blank line is a JSON object with ``input_length``
    and ``output_length`` (and no ``prompt_tokens``), or a ``.json`` file's array's first
    element is; else ``jsonl`` for .jsonl/.json (inside a compressed file: ``.jsonl.gz``);
    else the CSV flavour named by the header: Azure's, BurstGPT's, or ``csv`` where any
    column is named by `COLUMN_NAMES`.

    Raises:
        TraceError: none of these (the message lists the names a header may give), or a
            file that is not UTF-8 text or a broken archive.
    """
    with _reading(path):
        first = _first_non_blank_line(path)
        if _is_mooncake_line(first):
            return "mooncake"
        suffix = _inner_name(path).suffix
        if suffix == ".json" and first.lstrip().startswith("["):
            return "mooncake" if _is_mooncake_row(_first_element(path)) else "jsonl"
        if suffix in (".jsonl", ".json"):
            return "jsonl"
        with _open_text(path) as handle:
            header = handle.readline()
        if "ContextTokens" in header:
            return "azure"
        if "Request tokens" in header:
            return "burstgpt"
        cells = _header_cells(header)
        if _find_columns(cells)[0]:
            return "csv"
    if isinstance(_json_value(header), dict):
        raise TraceError(
            f"{path}:1: cannot tell the trace format: its first line is a JSON object but its "
            "name ends in neither .jsonl nor .json; rename it or pass --format jsonl"
        )
    shown = ", ".join(cells)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    raise TraceError(
        f"{path}:1: cannot tell the trace format from its header ({shown}); pass --format, "
        f"or name the columns as a CSV or TSV header may: {_accepted_names()}"
    )


def _first_non_blank_line(path: Path) -> str:
    with _open_text(path) as handle:
        return next((line for line in handle if line.strip()), "")


def _first_element(path: Path) -> object:
    """The first element of the JSON array a file holds (None: none, or no array)."""
    records = _json_records(_Source(path, "jsonl", is_array=True))
    try:
        return next(records, (0, None))[1]
    except TraceError:
        return None
    finally:
        records.close()


def _json_value(line: str) -> object:
    """A line's JSON value (None: not JSON)."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def _is_mooncake_line(line: str) -> bool:
    return _is_mooncake_row(_json_value(line))


def _is_mooncake_row(row: object) -> bool:
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
    """The requests a `TraceWindow` took of a trace, how many the trace holds and over
    how many seconds their arrivals spread (to say what was taken), and how its file was
    read (`TraceColumns`)."""

    requests: list[RequestSpec]
    num_trace_requests: int
    trace_span_s: float
    columns: TraceColumns | None = None


def read_trace(
    path: str | Path, fmt: str | None = None, time_unit: str | None = None
) -> list[RequestSpec]:
    """Read a trace file into requests sorted by arrival, times from the first arrival;
    ``time_unit`` (a `TIME_UNITS` key) is that of numeric times whose column names no
    unit (None: seconds, or the format's own).

    Raises:
        TraceError: not a regular file (a pipe, a device), unknown format or time unit,
            not a UTF-8 text file, a corrupt or
            truncated archive, malformed line, missing column, a non-finite time, a
            ``time_unit`` that contradicts a column, or no requests.
        FileNotFoundError: no such file.
    """
    return read_trace_part(path, fmt, time_unit=time_unit).requests


def read_trace_part(
    path: str | Path,
    fmt: str | None = None,
    window: TraceWindow | None = None,
    time_unit: str | None = None,
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
    if not path.exists():
        raise FileNotFoundError(f"no such trace file: {path}")
    if not path.is_file():  # a pipe (<(zcat ...)) or a device: read once, it cannot be re-read
        raise TraceError(f"{path}: not a regular file; save the trace to a file and pass that")
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise TraceError(f"unknown time unit {time_unit!r}; known: {', '.join(TIME_UNITS)}")
    with _reading(path):
        source = _source(path, fmt or guess_format(path))
        rows, columns = _read_rows(source, time_unit)
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
        content = _content(source, {row[1] for row in taken} if len(taken) < len(rows) else None)
    return TracePart(_requests(source, taken, first, content), len(rows), span_s, columns)


def _requests(
    source: _Source,
    rows: list[tuple[float, int, int, int]],
    first_id: int,
    content: dict[int, _Content],
) -> list[RequestSpec]:
    """``rows`` (sorted) as requests, ids from ``first_id``, times from the first row's."""
    start = rows[0][0]
    requests = []
    for i, (arrival, key, prompt, output) in enumerate(rows, start=first_id):
        segments, output_segment = content.get(key, ((), None))
        try:
            requests.append(
                RequestSpec(i, arrival - start, prompt, output, segments, output_segment)
            )
        except ValueError as error:
            raise TraceError(f"{source.where(key)}: {error}") from None
    return requests


_CONTENT_ID = (str, int)

_Content = tuple[tuple[Segment, ...], Hashable | None]
"""A record's ``segments`` and ``output_segment``."""


def _content(source: _Source, keys: set[int] | None = None) -> dict[int, _Content]:
    """By record key: what the prompts of a file that names them are made of (none for
    CSV), of the ``keys`` given (None: every record)."""
    if source.fmt == "jsonl":
        return _jsonl_content(source, keys)
    if source.fmt == "mooncake":
        return _mooncake_content(source, keys)
    return {}


def _content_id(value: object, field: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, _CONTENT_ID):
        raise ValueError(f"{field}: a content id is a string or an integer, got {value!r}")
    return value


def _json_objects(source: _Source, keys: set[int] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each record of a file `_json_rows` has read, as its object (of the ``keys``
    given; None: all). A line is parsed only where its key is asked for."""
    if source.is_array:
        for key, value in _json_records(source):
            if keys is None or key in keys:
                yield key, value  # type: ignore[misc]  # an object: `_json_rows` said so
        return
    with _open_text(source.path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if (keys is None or line_no in keys) and line.strip():
                yield line_no, json.loads(line)


def _jsonl_content(source: _Source, keys: set[int] | None) -> dict[int, _Content]:
    """By key: the ``segments`` and ``output_segment`` of the records that give them."""
    content: dict[int, _Content] = {}
    for key, row in _json_objects(source, keys):
        if "segments" not in row and "output_segment" not in row:
            continue
        try:
            content[key] = (_segments(row.get("segments", [])), _output_id(row))
        except ValueError as error:
            raise TraceError(f"{source.where(key)}: {error}") from None
    return content


def _mooncake_content(source: _Source, keys: set[int] | None) -> dict[int, _Content]:
    """By key: the segments of the records with hash ids."""
    content: dict[int, _Content] = {}
    field = source.prompt_field
    for key, row in _json_objects(source, keys):
        try:
            prompt = _tokens(row[field], field)
            segments = _block_segments(row.get("hash_ids"), prompt, key)
        except ValueError as error:
            raise TraceError(f"{source.where(key)}: {error}") from None
        if segments:
            content[key] = (segments, None)
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
