"""Trace files as workloads of a sweep (``avmp bench --trace FILE``).

A trace workload is named after its file: the name less its suffixes of format and
compression (``chat.jsonl.gz``: ``chat``). Its requests are read once, in the parent, as
``avmp replay`` reads them (`avmp.bench.traces`), what their prompts share included.

A trace has no seed: replayed as recorded, it is one cell per model, budget, profile,
layout and prefix cache, saved as seed 0. Re-timed by an arrival process (``--arrival``),
each seed of the grid draws its own arrival times for the same requests in the same
order (`avmp.bench.workloads.with_arrivals`), one cell per seed, as a preset's seed does.
A trace whose prompts name an earlier request's output (a conversation's next turn) is
not re-timed: its turns are timed after the ones they follow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avmp.bench.traces import COMPRESSED, TraceWindow, guess_format, read_trace_part
from avmp.bench.workloads import PREFIX_PRESETS, PRESETS, ArrivalProcess, with_arrivals
from avmp.sched.request import RequestSpec

AS_RECORDED_SEED = 0
"""The seed coordinate of a trace replayed with its own arrival times."""


@dataclass(frozen=True)
class TraceWorkload:
    """One trace file as a workload of a sweep: its name in cells and reports, where it
    came from, and the requests taken of it, in arrival order (ids: their places in the
    file by arrival).

    Attributes:
        name: the workload's name (`trace_workload_name` of the file).
        path: the file as given.
        requests: the requests replayed (all of the file's, or its first ``max_requests``).
        num_file_requests: how many requests the file holds.
        fmt: the format it was read as (`avmp.bench.traces.FORMATS`).
        read_as: how its columns were found, where by their names (else empty).
    """

    name: str
    path: str
    requests: tuple[RequestSpec, ...] = field(repr=False)
    num_file_requests: int
    fmt: str
    read_as: str = ""

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"{self.path}: a trace workload needs at least one request")

    def shares_prefixes(self) -> bool:
        """Whether its prompts name what they share (segments), for a prefix cache."""
        return any(r.segments for r in self.requests)

    def names_earlier_outputs(self) -> bool:
        """Whether some prompt holds an earlier request's output (a next turn)."""
        outputs = {r.output_segment for r in self.requests if r.output_segment is not None}
        return any(content in outputs for r in self.requests for content, _ in r.segments)

    def timed(self, arrival: ArrivalProcess | None, seed: int) -> tuple[RequestSpec, ...]:
        """Its requests as a cell of ``seed`` replays them: as recorded (``arrival``
        None), or re-timed by ``arrival`` from that seed."""
        if arrival is None:
            return self.requests
        return tuple(with_arrivals(list(self.requests), arrival, seed))

    def source(self) -> dict[str, Any]:
        """Where its requests came from, as a cell records it."""
        return {
            "file": self.path,
            "format": self.fmt,
            "num_file_requests": self.num_file_requests,
        }


def trace_workload_name(path: str | Path) -> str:
    """The name of a trace file's workload: its name less a compression suffix and the
    format's (``data/chat.jsonl.gz``: ``chat``)."""
    path = Path(path)
    if path.suffix in COMPRESSED:
        path = path.with_suffix("")
    return path.stem


def _name_key(name: str) -> str:
    """What a name becomes in a cell's file name (`avmp.bench.sweep.CellSpec.cell_id`),
    case aside: two names with one key would share cell files."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", name).casefold()


def check_trace_names(named: Sequence[tuple[str, str]]) -> None:
    """Refuse trace workloads, given as (name, path), whose names clash with a preset's
    or with each other's, as their cells' file names would (in any case, characters a
    file name cannot hold read as ``-``).

    Raises:
        ValueError: one line naming the files.
    """
    presets = {_name_key(p): p for p in (*PRESETS, *PREFIX_PRESETS)}
    seen: dict[str, tuple[str, str]] = {}  # name key -> (name, path)
    for name, path in named:
        if not name:
            raise ValueError(
                f"--trace {path}: a trace workload is named after its file, and this one's "
                "name is empty"
            )
        key = _name_key(name)
        if key in presets:
            raise ValueError(
                f"--trace {path}: a trace workload is named after its file, and {name!r} "
                f"is the preset {presets[key]}'s name; rename the file"
            )
        if key in seen:
            raise ValueError(_clash(*seen[key], name, path))
        seen[key] = (name, path)


def _clash(first_name: str, first_path: str, name: str, path: str) -> str:
    if first_path == path:
        return f"--trace {path} is given twice"
    if first_name == name:
        workloads = f"would both be the workload {name!r}"
    else:  # one cell file name: in another case, or by characters a file name cannot hold
        workloads = f"would be the workloads {first_name!r} and {name!r}, which share cell files"
    return (
        f"--trace {first_path} and {path} {workloads} (a trace workload is named after its "
        "file); rename one"
    )


def read_trace_workload(
    path: str,
    fmt: str | None = None,
    time_unit: str | None = None,
    max_requests: int | None = None,
) -> TraceWorkload:
    """Read a trace file (its first ``max_requests`` requests by arrival; None: all) as
    a workload, as ``avmp replay`` reads it with ``--format``, ``--time-unit`` and
    ``--max-requests``.

    Raises:
        TraceError: the file cannot be read as a trace (naming it and the line).
        FileNotFoundError: no such file.
    """
    window = TraceWindow(max_requests=max_requests)
    part = read_trace_part(path, fmt, window, time_unit)
    columns = part.columns
    return TraceWorkload(
        name=trace_workload_name(path),
        path=path,
        requests=tuple(part.requests),
        num_file_requests=part.num_trace_requests,
        fmt=fmt or guess_format(Path(path)),
        read_as=columns.describe() if columns is not None and columns.is_generic else "",
    )
