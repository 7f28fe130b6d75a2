"""`avmp bench` with the long-document, burst and multi-turn workloads: listed, run,
re-timed by --arrival, and a bad bursts arrival is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.bench.sweep import trace_digest
from avmp.bench.workloads import make_workload, parse_arrival
from avmp.cli import main

OURS = "longdoc_mix,longdoc_burst,multi_turn"
TINY = ["--quick", "--models", "granite-4.0-h-micro", "--budgets", "1GiB", "--seeds", "1",
        "--workloads", OURS, "--workers", "1", "--no-progress"]


def test_help_lists_every_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("agentic_burst", "shift", *OURS.split(",")):
        assert name in text
    assert "bursts:RATE:SIZE:GAP_S" in text


def test_bench_runs_the_new_workloads_and_honours_arrival(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 12)
    out = tmp_path / "res"
    assert main(["bench", "--out", str(out), *TINY, "--arrival", "bursts:50:4:1"]) == 0
    printed = capsys.readouterr().out
    for name in OURS.split(","):
        assert f"| {name} | unified |" in printed
    arrival = parse_arrival("bursts:50:4:1")
    for name in OURS.split(","):
        cell = json.loads(next((out / "cells").glob(f"{name}__*__avmp.json")).read_text())
        assert cell["settings"]["arrival"] == "bursts:50:4:1"
        assert cell["result"]["num_requests"] == 12
        # The cell replayed the preset's lengths with the override's times.
        expected = make_workload(name, 0, 12, arrival)
        assert cell["trace"]["sha256"] == trace_digest(expected)
        own = make_workload(name, 0, 12)
        assert [r.prompt_tokens for r in expected] == [r.prompt_tokens for r in own]
        assert [r.arrival_s for r in expected] != [r.arrival_s for r in own]


@pytest.mark.parametrize("arrival", ["bursts:50:4", "bursts:50:0.5:1", "bursts:50:4:-1"])
def test_bad_bursts_arrival_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arrival: str
) -> None:
    assert main(["bench", "--out", str(tmp_path), *TINY, "--arrival", arrival]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "arrival" in err or "burst" in err
