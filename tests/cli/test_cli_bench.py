from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from avmp.cli import main

TINY = ["--models", "jamba-1.5-mini", "--budgets", "1GiB", "--seeds", "2",
        "--workloads", "uniform_short,shift", "--workers", "1", "--no-progress"]


def test_bench_runs_prints_table_and_writes_report(tmp_path: Path, capsys,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 10)
    out = tmp_path / "res"
    assert main(["bench", "--quick", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "| shift | static | 2 |" in printed and "24 cells (24 simulated now" in printed
    assert (out / "report.md").exists() and (out / "report.html").exists()
    cells = list((out / "cells").glob("*.json"))
    assert len(cells) == 24  # 2 workloads x 2 seeds x 6 layouts
    assert json.loads(cells[0].read_text())["settings"]["num_requests"] == 10
    # a second run resumes: nothing left to simulate, same table
    assert main(["bench", "--quick", "--out", str(out), *TINY]) == 0
    again = capsys.readouterr().out
    assert again.splitlines()[:8] == printed.splitlines()[:8]
    assert "24 cells (0 simulated now" in again


@pytest.mark.parametrize(("args", "message"), [
    (["--budgets", "zero"], "bad size"),
    (["--models", "no-such-model"], "unknown model"),
    (["--calibration", "/no/such.json"], "no such calibration file"),
    (["--seeds", "0"], "--seeds must be between 1 and"),
    (["--workloads", "nope"], "unknown workload"),
    (["--profiles", "tpu"], "unknown profile"),
    (["--arrival", "zipf:2"], "bad arrival"),
])
def test_bench_user_mistakes_are_one_line_exit_2(tmp_path: Path, capsys, args: list[str],
                                                 message: str) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bench_ray_without_ray(tmp_path: Path, capsys,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = ["bench", "--quick", "--out", str(tmp_path), *TINY, "--ray", "auto",
            "--workloads", "uniform_short", "--seeds", "1"]
    assert main(args) == 2
    assert "pip install 'avmp[ray]'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_bench_finishes_within_a_minute(tmp_path: Path, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("AVMP_CACHE_DIR", str(tmp_path / "cache"))  # cold ShareGPT cache

    started = time.monotonic()
    assert main(["bench", "--quick", "--out", str(tmp_path / "res"), "--no-progress"]) == 0
    assert time.monotonic() - started < 60
    assert "sharegpt_replay" in capsys.readouterr().out


def test_bench_arrival_override_changes_the_traces(tmp_path: Path, capsys) -> None:
    args = ["bench", "--quick", "--workers", "1", "--no-progress", "--workloads", "uniform_short",
            "--seeds", "1", "--budgets", "1GiB"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--arrival", "poisson:5"]) == 0
    capsys.readouterr()
    name = "uniform_short__jamba-1.5-mini__1p0GiB__h200__s0__avmp.json"
    a = json.loads((tmp_path / "a" / "cells" / name).read_text())
    b = json.loads((tmp_path / "b" / "cells" / name).read_text())
    assert (a["settings"]["arrival"], b["settings"]["arrival"]) == (None, "poisson:5")
    assert a["trace"]["sha256"] != b["trace"]["sha256"]
    assert b["result"]["makespan_s"] > a["result"]["makespan_s"]  # 5 req/s, not 50


def test_bench_skips_infeasible_cells_and_says_so(tmp_path: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 8)
    args = ["bench", "--quick", "--out", str(tmp_path), "--models", "jamba-1.5-mini",
            "--budgets", "1GiB", "--seeds", "1", "--workloads", "shift", "--workers", "1",
            "--no-progress", "--profiles", "h100,h200"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "6 cells (6 simulated now" in printed
    assert "skipped 6 infeasible cells (1 model/budget/profile combinations: " \
           "jamba-1.5-mini 1.0 GiB h100)" in printed
    run = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])
    assert run["skipped_infeasible"] == [
        {"model": "jamba-1.5-mini", "budget_bytes": 1 << 30, "profile": "h100"}]
    assert sorted(p.name.split("__")[3] for p in (tmp_path / "cells").glob("*.json")) == \
        ["h200"] * 6


def test_bench_of_only_infeasible_cells_is_one_line(tmp_path: Path, capsys) -> None:
    args = ["bench", "--quick", "--out", str(tmp_path), *TINY, "--profiles", "h100"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "every cell is infeasible: jamba-1.5-mini cannot run on" in err
    assert "--ignore-feasibility" in err


def test_bench_options_reach_the_saved_settings(tmp_path: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 6)
    args = ["bench", "--quick", "--out", str(tmp_path), "--models", "nemotron-h-8b",
            "--budgets", "1GiB", "--seeds", "1", "--workloads", "shift", "--workers", "1",
            "--no-progress", "--ssm-dtype", "auto", "--static-options", "padding_slot,give_back"]
    assert main(args) == 0
    capsys.readouterr()
    settings = json.loads(next((tmp_path / "cells").glob("*.json")).read_text())["settings"]
    assert settings["ssm_dtype"] == "auto"
    assert settings["static_options"] == ["padding_slot", "give_back"]
    assert main([*args[:-2], "--static-options", "padding"]) == 2
    assert "unknown static option 'padding'" in capsys.readouterr().err
    assert main([*args[:-4], "--ssm-dtype", "fp64"]) == 2
    assert "--ssm-dtype must be one of" in capsys.readouterr().err
