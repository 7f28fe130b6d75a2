"""benchmarks/prefix.py on a tiny grid: every policy runs on the same trace, the table
and the bars are drawn from the saved result."""

from __future__ import annotations

from pathlib import Path

from benchmarks import prefix
from benchmarks.common import read_result


def test_tiny_prefix_benchmark_saves_and_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "prefix.json.gz"
    argv = ["--models", "granite-4.0-h-tiny", "--budgets", "8GiB", "--workloads",
            "shared_shift", "--requests", "12", "--out", str(out)]
    assert prefix.main(argv) == 0
    saved = read_result(out)
    (cell,) = saved["cells"]
    assert set(prefix.POLICIES) <= set(cell)
    for policy in prefix.POLICIES[1:]:  # the ideal follows each run's own admissions
        report = cell[policy]["prefix"]
        assert 0 < report["num_hit_tokens"] <= report["num_ideal_tokens"]
    text = prefix.table(saved) + "\n" + prefix.bars(saved)
    assert "| shared_shift | granite-4.0-h-tiny | 8GiB |" in text
    assert ">= 90% of the ideal: " in text and "of 1 cells with reuse" in text
    assert "0 of 0 cells without reuse" in text
