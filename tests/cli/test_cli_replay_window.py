"""``avmp replay --max-requests/--start/--duration``: part of a trace, the same results
as a file of only those requests; bad values and an empty part are one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from avmp.bench.traces import read_trace, write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import main

ARGV = ["--model", "granite-4.0-h-micro", "--memory", "1GiB", "--allocators", "avmp,static"]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    write_jsonl(make_workload("shift", 0, num_requests=40), path)
    return path


def _results(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    """The --json results less the measured CPU time (no two runs share it)."""
    return [{k: v for k, v in r.items() if not k.startswith("measured_")}
            for r in json.loads(capsys.readouterr().out)]  # fmt: skip


def _replay_file(requests: list, path: Path, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    write_jsonl(requests, path)
    assert main(["replay", str(path), *ARGV, "--json"]) == 0
    return _results(capsys)


def test_max_requests_replays_the_first_by_arrival(
    trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(trace), *ARGV, "--max-requests", "15", "--json"]) == 0
    taken = _results(capsys)
    assert _replay_file(read_trace(trace)[:15], tmp_path / "first.jsonl", capsys) == taken
    assert main(["replay", str(trace), *ARGV, "--max-requests", "15"]) == 0
    assert "15 requests of its 40 (the first 15)," in capsys.readouterr().out
    assert main(["replay", str(trace), *ARGV, "--max-requests", "99", "--json"]) == 0
    assert _results(capsys) == _replay_file(read_trace(trace), tmp_path / "all.jsonl", capsys)


def test_a_window_of_arrivals_is_rebased_and_keeps_the_trace_ids(
    trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The requests arriving in [S, S + D) replay as a file of only them, arriving from
    0, would; their ids stay their places in the whole trace."""
    requests = read_trace(trace)
    start, duration = requests[10].arrival_s - 1e-9, requests[30].arrival_s - requests[10].arrival_s
    argv = ["replay", str(trace), *ARGV, "--start", repr(start), "--duration", repr(duration)]
    assert main([*argv, "--json"]) == 0
    taken = _results(capsys)
    first = requests[10].arrival_s
    alone = [replace(r, request_id=r.request_id - 10, arrival_s=r.arrival_s - first)
             for r in requests[10:30]]  # fmt: skip
    expected = _replay_file(alone, tmp_path / "window.jsonl", capsys)
    for result, reference in zip(taken, expected, strict=True):
        ids = result.pop("completed_requests")["request_id"]
        assert ids == [i + 10 for i in reference.pop("completed_requests")["request_id"]]
        for rejection in result["rejections"]:
            rejection["request_id"] -= 10
        assert {k: v for k, v in result.items() if k != "completed_requests"} == reference
    assert main([*argv, "--max-requests", "5", "--json"]) == 0
    assert [r["num_requests"] for r in _results(capsys)] == [5, 5]
    assert main([*argv, "--max-requests", "5"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "5 requests of its 40 (arriving from " in header
    assert "re-based to 0; the first 5 of those)" in header


@pytest.mark.parametrize("args, message", [
    (["--max-requests", "0"], "--max-requests must be a whole number >= 1, got '0'"),
    (["--max-requests", "ten"], "--max-requests must be a whole number >= 1, got 'ten'"),
    (["--start", "-1"], "--start must be a number of seconds >= 0, got '-1'"),
    (["--start", "nan"], "--start must be a number of seconds >= 0"),
    (["--duration", "0"], "--duration must be a number of seconds > 0, got '0'"),
    (["--duration", "inf"], "--duration must be a number of seconds > 0"),
    (["--start", "1e6"], "no request arrives from 1e+06 s to the end (its 40 requests arrive "
                         "from 0 s to"),
])  # fmt: skip
def test_bad_values_and_an_empty_part_are_one_line(
    trace: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["replay", str(trace), *ARGV, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
