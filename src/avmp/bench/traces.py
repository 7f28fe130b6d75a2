"""Trace files: JSONL, the Azure LLM inference trace CSV, and BurstGPT CSV.

Every reader returns requests in arrival order with times in seconds from the first
arrival. A malformed line, a missing column or an empty trace raises `TraceError`
naming the file and the line, so a user can fix the file.

Formats:
- ``jsonl``: one object per line with ``arrival_s``, ``prompt_tokens``, ``output_tokens``
  (blank lines skipped), and optionally what the prompt is made of, for prefix caching:
  ``segments``, a list of ``[content id, tokens]`` pairs in order that sum to
  ``prompt_tokens`` (the same id, a string or an integer, means the same tokens: a
  system prompt, a conversation's history), and ``output_segment``, the id under which
  a later prompt names this request's output (`avmp.sched.request.RequestSpec`).
- ``azure``: Azure LLM inference trace 2023/2024, header ``TIMESTAMP,ContextTokens,
  GeneratedTokens``; TIMESTAMP is a datetime (``2023-11-16 18:15:46.6805900``; digits
  beyond microseconds are dropped).
- ``burstgpt``: BurstGPT, header ``Timestamp,Model,Request tokens,Response tokens,
  Total tokens,Log Type``; Timestamp is seconds. Rows with 0 response tokens (failed
  requests in the trace) are skipped, as no output can be replayed for them.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from avmp.sched.request import RequestSpec

FORMATS = ("jsonl", "azure", "burstgpt")


class TraceError(ValueError):
    """A trace file that cannot be read: the message names the file and line."""


def _tokens(value: object, what: str) -> int:
    """A token count: a whole number >= 0, written as a number or as digits (JSON
    ``true`` is not 1 token; ``Infinity`` and ``NaN`` are no count at all)."""
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


def _seconds(value: object, what: str = "arrival time") -> float:
    """A finite time in seconds (a NaN arrival would stall the simulated clock)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return seconds


_JSONL_FIELDS = ("arrival_s", "prompt_tokens", "output_tokens")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, float, int, int]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object with {', '.join(_JSONL_FIELDS)}")
                yield (
                    line_no,
                    _seconds(row["arrival_s"], "arrival_s"),
                    _tokens(row["prompt_tokens"], "prompt_tokens"),
                    _tokens(row["output_tokens"], "output_tokens"),
                )
            except KeyError as error:
                raise TraceError(f"{path}:{line_no}: missing field {error.args[0]!r}") from None
            except ValueError as error:
                raise TraceError(f"{path}:{line_no}: {error}") from None


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _parse_datetime(text: str) -> float:
    """Seconds since the epoch of an Azure TIMESTAMP (nanosecond digits truncated)."""
    moment = datetime.fromisoformat(_FRACTION.sub(r"\1", text.strip()))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # naive: read as UTC, no DST jumps
    return moment.timestamp()


def _csv_rows(
    path: Path, columns: tuple[str, str, str], parse_time: Callable[[str], float]
) -> Iterator[tuple[int, float, int, int]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(
                f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})"
            )
        reader.fieldnames = header
        for row in reader:
            line_no = reader.line_num
            try:
                time_text, prompt_text, output_text = (_cell(row, c) for c in columns)
                yield (
                    line_no,
                    parse_time(time_text),
                    _tokens(prompt_text, columns[1]),
                    _tokens(output_text, columns[2]),
                )
            except ValueError as error:
                raise TraceError(f"{path}:{line_no}: {error}") from None


def _cell(row: dict[str, str | None], column: str) -> str:
    value = row.get(column)
    if value is None or not value.strip():
        raise ValueError(f"no value in column {column}")
    return value


def _burstgpt_time(text: str) -> float:
    return _seconds(text, "Timestamp")


def _rows(path: Path, fmt: str) -> Iterator[tuple[int, float, int, int]]:
    if fmt == "jsonl":
        return _jsonl_rows(path)
    if fmt == "azure":
        return _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), _parse_datetime)
    return _csv_rows(path, ("Timestamp", "Request tokens", "Response tokens"), _burstgpt_time)


def guess_format(path: Path) -> str:
    """``jsonl`` for .jsonl/.json, else the CSV flavour named by the header."""
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    with path.open(encoding="utf-8") as handle:
        header = handle.readline()
    if "ContextTokens" in header:
        return "azure"
    if "Request tokens" in header:
        return "burstgpt"
    raise TraceError(f"{path}:1: cannot tell the trace format from its header; pass --format")


def read_trace(path: str | Path, fmt: str | None = None) -> list[RequestSpec]:
    """Read a trace file into requests sorted by arrival, times from the first arrival.

    Raises:
        TraceError: unknown format, not a UTF-8 text file, malformed line, missing
            column, a non-finite time, or no requests.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.is_dir():
        raise TraceError(f"{path}: is a directory, not a trace file")
    if not path.is_file():
        raise FileNotFoundError(f"no such trace file: {path}")
    try:
        rows = _read_rows(path, fmt or guess_format(path))
    except UnicodeDecodeError as error:
        raise TraceError(
            f"{path}: not a UTF-8 text file ({error.reason}); expected {', '.join(FORMATS)}"
        ) from None
    except csv.Error as error:
        raise TraceError(f"{path}: unreadable CSV: {error}") from None
    rows.sort()
    start = rows[0][0]
    if not math.isfinite(rows[-1][0] - start):
        raise TraceError(f"{path}: arrival times span more seconds than a float holds")
    content = _jsonl_content(path) if (fmt or guess_format(path)) == "jsonl" else {}
    requests = []
    for i, (arrival, line_no, prompt, output) in enumerate(rows):
        segments, output_segment = content.get(line_no, ((), None))
        try:
            requests.append(
                RequestSpec(i, arrival - start, prompt, output, segments, output_segment)
            )
        except ValueError as error:
            raise TraceError(f"{path}:{line_no}: {error}") from None
    return requests


_CONTENT_ID = (str, int)


def _content_id(value: object, field: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, _CONTENT_ID):
        raise ValueError(f"{field}: a content id is a string or an integer, got {value!r}")
    return value


def _jsonl_content(path: Path) -> dict[int, tuple[tuple[tuple[str | int, int], ...], object]]:
    """By line: the ``segments`` and ``output_segment`` of the lines that give them."""
    content: dict[int, tuple[tuple[tuple[str | int, int], ...], object]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)  # valid: `_jsonl_rows` read it first
            if "segments" not in row and "output_segment" not in row:
                continue
            try:
                content[line_no] = (_segments(row.get("segments", [])), _output_id(row))
            except ValueError as error:
                raise TraceError(f"{path}:{line_no}: {error}") from None
    return content


def _segments(value: object) -> tuple[tuple[str | int, int], ...]:
    if not isinstance(value, list):
        raise ValueError("segments: a list of [content id, tokens] pairs")
    pieces = []
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
        if fmt == "burstgpt" and output == 0:
            continue
        if prompt < 1 or output < 1:
            raise TraceError(f"{path}:{line_no}: prompt and output tokens must be >= 1")
        rows.append((arrival, line_no, prompt, output))
    if not rows:
        raise TraceError(f"{path}: empty trace (no requests)")
    return rows


def write_jsonl(requests: list[RequestSpec], path: str | Path) -> None:
    """Write requests as a JSONL trace (the format `read_trace` reads back)."""
    with Path(path).open("w") as handle:
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
