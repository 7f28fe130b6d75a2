"""``avmp replay --prefix-cache``: off prints what it printed before, on adds one line
per allocator, and a budget without room for a checkpoint is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import main

ARGS = ["--model", "nemotron-h-8b", "--profile", "h200", "--allocators", "avmp,oracle"]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    write_jsonl(make_workload("shift", 0, num_requests=12), path)
    return path


def test_off_is_the_default_and_on_reports_each_allocator(
    trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(trace), *ARGS, "--memory", "4GiB"]) == 0
    plain = capsys.readouterr().out
    assert main(["replay", str(trace), *ARGS, "--memory", "4GiB", "--prefix-cache", "off"]) == 0
    assert capsys.readouterr().out == plain and "prefix cache" not in plain
    assert main(["replay", str(trace), *ARGS, "--memory", "4GiB", "--prefix-cache", "avmp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = [line for line in lines if "prefix cache avmp (flops eviction)" in line]
    assert [line.split(":")[0] for line in summary] == ["avmp", "oracle"]
    assert all("of the ideal" in line for line in summary)


def test_a_budget_without_room_for_a_checkpoint_is_one_line(
    trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*ARGS, "--memory", "2MiB", "--prefix-cache", "sglang", "--ignore-feasibility"]
    assert main(["replay", str(trace), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefix caching needs room for a checkpoint" in err[0]
