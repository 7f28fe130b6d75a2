"""`avmp replay --tensor-parallel N`: each allocator holds one rank's units, the
roofline adds the all-reduces, and a split that cannot be is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import main

BASE = ["--model", "nemotron-h-8b", "--memory", "16GiB", "--profile", "h200", "--json"]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    write_jsonl(make_workload("shift", 0, num_requests=24), path)
    return path


def _replay(trace: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, dict]:
    argv = ["replay", str(trace), *BASE, "--allocators", "avmp,static", *args]
    assert main(argv) == 0
    return {r["allocator"]: r for r in json.loads(capsys.readouterr().out)}


def test_a_split_replays_faster_steps_but_not_n_times_faster(
    trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _replay(trace, capsys)
    two = _replay(trace, capsys, "--tensor-parallel", "2")
    for name in ("avmp", "static"):
        assert two[name]["num_completed"] == one[name]["num_completed"] == 24
        assert two[name]["num_preemptions"] == one[name]["num_preemptions"] == 0
    # the same batches (16 GiB holds them all): half the weights and units per step,
    # plus the all-reduces, so each output token comes faster, not twice as fast
    for key in ("tpot_p50_s", "makespan_s"):
        assert one["avmp"][key] / 2 < two["avmp"][key] < one["avmp"][key]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tensor-parallel", "9"], "--tensor-parallel must be in 1..8"),
        (["--tensor-parallel", "3"], "nemotron-h-8b on 3 GPUs: attention heads (32)"),
        (["--tensor-parallel", "2", "--profile", "a100"], "a100 has no GPU-to-GPU link"),
    ],
)
def test_a_split_that_cannot_be_is_one_line(
    trace: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["replay", str(trace), "--model", "nemotron-h-8b", "--memory", "16GiB", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_calibration_is_refused_with_a_split(
    trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calibration = tmp_path / "calibration.json"
    calibration.write_text("{}")
    argv = ["replay", str(trace), "--model", "nemotron-h-8b", "--memory", "16GiB"]
    argv += ["--tensor-parallel", "2", "--calibration", str(calibration)]
    assert main(argv) == 2
    assert "--tensor-parallel needs the roofline" in capsys.readouterr().err
