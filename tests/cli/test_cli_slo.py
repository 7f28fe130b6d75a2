"""Goodput objectives and throughput over the requests every allocator completed, through
`avmp replay` and `avmp bench` (and cells saved before them, through `avmp report`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import main
from avmp.sched.request import RequestSpec

REPLAY = ["--model", "granite-4.0-h-micro", "--memory", "1GiB"]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    write_jsonl(make_workload("shift", 0, num_requests=12), path)
    return path


def _rows(out: str) -> dict[str, dict[str, str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    headers = [h.strip() for h in lines[0].split("|")[1:-1]]
    return {cells[0]: dict(zip(headers, cells, strict=True))
            for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in lines[1:])}


def test_replay_shows_goodput_and_throughput_over_shared_requests(trace: Path, capsys) -> None:
    assert main(["replay", str(trace), *REPLAY]) == 0
    out = capsys.readouterr().out
    assert "all completed: the 12 requests every allocator completed" in out
    assert "goodput: TTFT <= 2 s and TPOT <= 100 ms" in out
    rows = _rows(out)
    for row in rows.values():  # everything completed: the shared set is every request
        assert row["req/s, all completed"] == row["req/s"]
        assert float(row["goodput req/s"]) <= float(row["req/s"])
    assert rows["avmp"]["vs avmp, all completed"] == "1.00x"
    assert main(["replay", str(trace), *REPLAY, "--slo-ttft-s", "1e-9"]) == 0
    assert all(r["goodput req/s"] == "0.000" for r in _rows(capsys.readouterr().out).values())


def test_replay_compares_only_what_every_allocator_completed(tmp_path: Path, capsys) -> None:
    # request 2 fits AVMP's moving split but not the static split's KV pool: static
    # rejects it, so the requests both completed are 0 and 1
    specs = [RequestSpec(0, 0.0, 100, 20), RequestSpec(1, 0.0, 100, 20),
             RequestSpec(2, 0.5, 35_000, 4)]
    path = tmp_path / "t.jsonl"
    write_jsonl(specs, path)
    argv = ["replay", str(path), "--model", "granite-4.0-h-micro", "--memory", "384MiB",
            "--allocators", "avmp,static", "--json"]
    assert main(argv) == 0
    avmp, static = json.loads(capsys.readouterr().out)
    assert (avmp["num_completed"], static["num_completed"]) == (3, 2)
    assert [r["request_id"] for r in static["rejections"]] == [2]
    shared = [f for r, f in zip(avmp["completed_requests"]["request_id"],
                                avmp["completed_requests"]["finish_s"], strict=True) if r < 2]
    assert avmp["common_request_throughput"] == pytest.approx(2 / max(shared))
    assert avmp["common_request_throughput"] > avmp["request_throughput"]
    assert static["common_request_throughput"] == pytest.approx(2 / static["makespan_s"],
                                                                rel=1e-3)


@pytest.mark.parametrize("args", [["--slo-ttft-s", "0"], ["--slo-tpot-ms", "-5"],
                                  ["--slo-tpot-ms", "nan"]])
def test_bad_objectives_are_one_line(trace: Path, tmp_path: Path, capsys,
                                     args: list[str]) -> None:
    assert main(["replay", str(trace), *REPLAY, *args]) == 2
    err = capsys.readouterr().err
    assert "objective must be a positive number" in err and err.count("\n") == 1
    out = tmp_path / "res"
    assert main(["bench", "--quick", "--out", str(out), "--no-progress", *args]) == 2
    assert "objective must be a positive number" in capsys.readouterr().err
    assert not out.exists()  # refused before any work


def test_bench_reports_goodput_and_old_cells_read_n_a(tmp_path: Path, capsys,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 10)
    out = tmp_path / "res"
    argv = ["bench", "--quick", "--out", str(out), "--models", "granite-4.0-h-micro",
            "--budgets", "1GiB", "--workloads", "shift", "--workers", "1", "--no-progress",
            "--slo-ttft-s", "5", "--slo-tpot-ms", "50"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "requests all completed, req/s [95% CI]" in printed and "goodput [95% CI]" in printed
    assert "TTFT <= 5 s and TPOT <= 50 ms" in (out / "report.md").read_text()
    shift_unified = next(line for line in printed.splitlines() if "| shift | unified |" in line)
    assert shift_unified.count("x [") >= 3  # req/s, all completed, goodput: ratio with CI
    for path in (out / "cells").glob("*.json"):  # as saved before per-request columns
        record = json.loads(path.read_text())
        del record["result"]["completed_requests"]
        path.write_text(json.dumps(record))
    assert main(["report", str(out)]) == 0
    old = next(line for line in capsys.readouterr().out.splitlines()
               if "| shift | unified |" in line)
    columns = [c.strip() for c in old.split("|")[1:-1]]
    assert columns[3] != "n/a" and columns[4:6] == ["n/a", "n/a"]
