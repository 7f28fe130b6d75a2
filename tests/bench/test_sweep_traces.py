"""Trace files as workloads of a sweep: names, seeds, what their cells record, and the
prefix sharing they name reaching the cells."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from avmp.bench.stats import coord, load_cells
from avmp.bench.sweep import ResultStore, SweepGrid, run_sweep, trace_digest
from avmp.bench.trace_workloads import (
    TraceWorkload,
    check_trace_names,
    read_trace_workload,
    trace_workload_name,
)
from avmp.bench.workloads import parse_arrival
from trace_helpers import (
    write_chat_jsonl,
    write_conversation_jsonl,
    write_lengths_csv,
    write_mooncake,
)

SMALL = {"allocators": ("avmp", "static"), "models": ("granite-4.0-h-tiny",),
         "budgets_bytes": (1 << 30,), "profiles": ("h200",)}


@pytest.mark.parametrize(("path", "name"), [
    ("data/chat.jsonl", "chat"), ("chat.jsonl.gz", "chat"), ("azure.csv.xz", "azure"),
    ("runs/a.b.csv", "a.b"), ("noext", "noext"),
])
def test_a_trace_is_named_after_its_file(path: str, name: str) -> None:
    assert trace_workload_name(path) == name


@pytest.mark.parametrize(("named", "message"), [
    ([("shift", "x/shift.csv")], "'shift' is the preset shift's name"),
    ([("Few_Shot", "Few_Shot.jsonl")], "the preset few_shot's name"),
    ([("a", "x/a.csv"), ("a", "y/a.jsonl")], "would both be the workload 'a'"),
    ([("a b", "a b.csv"), ("A-b", "A-b.csv")], "'a b' and 'A-b', which share cell files"),
    ([("a", "a.csv"), ("a", "a.csv")], "--trace a.csv is given twice"),
    ([("", ".gz")], "name is empty"),
])
def test_clashing_names_are_refused(named: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        check_trace_names(named)
    assert "\n" not in str(error.value)


def test_a_trace_has_one_cell_per_coordinate_unless_arrival_retimes_it(tmp_path: Path) -> None:
    trace = read_trace_workload(str(write_lengths_csv(tmp_path / "lens.csv")))
    grid = SweepGrid(workloads=("shift",), seeds=(0, 1, 2), traces=(trace,), **SMALL)
    assert grid.workload_names == ("shift", "lens")
    assert grid.seeds_for("lens") == (0,) and grid.seeds_for("shift") == (0, 1, 2)
    assert len(grid.cells()) == (3 + 1) * 2
    assert grid.requests_for("lens") == 5
    timed = replace(grid, arrival="poisson:4")
    assert timed.seeds_for("lens") == (0, 1, 2) and len(timed.cells()) == (3 + 3) * 2
    # the settings pin the requests read, not the seed's times
    assert timed.settings_for("lens")["trace_sha256"] == trace_digest(trace.requests)
    assert trace.timed(None, 0) == trace.requests
    arrival = parse_arrival("poisson:4")
    one, two = trace.timed(arrival, 1), trace.timed(arrival, 2)
    assert [(r.request_id, r.prompt_tokens) for r in one] == \
        [(r.request_id, r.prompt_tokens) for r in trace.requests]
    assert [r.arrival_s for r in one] != [r.arrival_s for r in two]


def test_arrival_cannot_retime_a_trace_of_turns(tmp_path: Path) -> None:
    turns = read_trace_workload(str(write_conversation_jsonl(tmp_path / "talk.jsonl")))
    assert turns.names_earlier_outputs()
    with pytest.raises(ValueError, match="cannot re-time the trace .*talk.jsonl"):
        SweepGrid(workloads=(), traces=(turns,), arrival="poisson:4", **SMALL)
    chat = read_trace_workload(str(write_chat_jsonl(tmp_path / "chat.jsonl")))
    assert not chat.names_earlier_outputs()
    SweepGrid(workloads=(), traces=(chat,), arrival="poisson:4", **SMALL)


def test_a_grid_needs_a_workload_and_no_empty_trace() -> None:
    with pytest.raises(ValueError, match="at least one of workloads or traces"):
        SweepGrid(workloads=(), **SMALL)
    with pytest.raises(ValueError, match="at least one request"):
        TraceWorkload("t", "t.csv", (), 0, "csv")


def test_prefix_sharing_a_trace_names_reaches_the_cells(tmp_path: Path) -> None:
    traces = (read_trace_workload(str(write_chat_jsonl(tmp_path / "chat.jsonl"))),
              read_trace_workload(str(write_mooncake(tmp_path / "kimi.jsonl"))))
    assert traces[1].fmt == "mooncake" and all(t.shares_prefixes() for t in traces)
    grid = SweepGrid(workloads=(), traces=traces, prefix_caches=("off", "avmp"),
                     **{**SMALL, "allocators": ("avmp",)})
    run_sweep(grid, tmp_path / "out", workers=1, progress=False)
    cells = load_cells(tmp_path / "out")
    assert len(cells) == 4
    for cell in cells:
        if coord(cell, "prefix_cache") == "avmp":
            assert cell["result"]["prefix"]["num_hit_tokens"] > 0, coord(cell, "workload")
        source = cell["trace"]["source"]
        assert source["file"].endswith((".jsonl",)) and source["num_file_requests"] >= 3


def test_a_changed_trace_is_refused_on_resume_and_an_unchanged_one_resumes(
    tmp_path: Path,
) -> None:
    path = write_lengths_csv(tmp_path / "lens.csv")
    grid = SweepGrid(workloads=(), traces=(read_trace_workload(str(path)),), **SMALL)
    assert run_sweep(grid, tmp_path / "out", workers=1, progress=False) == 2
    saved = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())
    assert saved["cell"]["seed"] == 0 and "trace_sha256" in saved["settings"]
    # the same requests written otherwise (spaces, another name of the time column)
    path.write_text(path.read_text().replace("timestamp,", "arrival_s,").replace(",", ", "))
    again = replace(grid, traces=(read_trace_workload(str(path)),))
    assert run_sweep(again, tmp_path / "out", workers=1, progress=False) == 0
    write_lengths_csv(path, num_requests=4)
    changed = replace(grid, traces=(read_trace_workload(str(path)),))
    with pytest.raises(ValueError, match="the requests of the trace lens changed since"):
        run_sweep(changed, tmp_path / "out", workers=1, progress=False)
    assert not ResultStore(tmp_path / "out").unreadable
