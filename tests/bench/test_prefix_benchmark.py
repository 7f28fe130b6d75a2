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
    assert "2x vllm-align's hits within the ideal (reachable by any policy): " in text
    assert "avmp+host: >= sglang's hits: " in text


def test_host_level_benchmark_saves_and_reads_back(tmp_path: Path) -> None:
    """--host-level: avmp without and with the second level on one trace; at 2 GiB the
    next turns of Nemotron-H-8B's conversations hit from the host tier."""
    out = tmp_path / "prefix_host.json.gz"
    argv = ["--host-level", "--models", "nemotron-h-8b", "--budgets", "2GiB", "--workloads",
            "multi_turn_prefix", "--requests", "96", "--out", str(out)]  # fmt: skip
    assert prefix.main(argv) == 0
    saved = read_result(out)
    assert saved["settings"]["policies"] == list(prefix.HOST_POLICIES)
    (cell,) = saved["cells"]
    assert "host_level" not in cell["avmp"]["prefix"]
    assert cell["avmp+host"]["prefix"]["host_level"]["num_restored"] > 0
    assert prefix._rate(cell, "avmp+host") > prefix._rate(cell, "avmp")
    assert cell["avmp+host"]["swap_s"] > 0
    text = prefix.host_table(saved)
    assert "| multi_turn_prefix | nemotron-h-8b | 2GiB |" in text
