from __future__ import annotations

from pathlib import Path

from avmp.bench.sweep import SweepGrid, run_sweep
from avmp.cli import main


def test_report_command_from_a_sweep(tmp_path: Path, capsys) -> None:
    grid = SweepGrid(workloads=("shift",), models=("jamba-1.5-mini",), budgets_bytes=(1 << 30,),
                     profiles=("h200",),  # Jamba's 96 GiB of weights need 141 GB
                     seeds=(0, 1), num_requests=(("shift", 9),))
    run_sweep(grid, tmp_path, workers=1, progress=False)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| shift | unified | 2 |" in out and "| shift | oracle | 2 |" in out
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_report_of_a_missing_directory(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such directory or file" in capsys.readouterr().err


def test_report_applies_the_goodput_objectives_it_is_given(tmp_path: Path, capsys) -> None:
    grid = SweepGrid(workloads=("shift",), models=("granite-4.0-h-micro",),
                     budgets_bytes=(1 << 30,), seeds=(0,), num_requests=(("shift", 9),))
    run_sweep(grid, tmp_path, workers=1, progress=False)
    assert main(["report", str(tmp_path), "--slo-ttft-s", "0.25", "--slo-tpot-ms", "7"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "TTFT <= 0.25 s and TPOT <= 7 ms" in report
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--slo-ttft-s", "nan"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
