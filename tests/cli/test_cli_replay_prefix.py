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


def test_a_trace_that_names_its_shared_content_gets_hits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # JSONL lines may say what their prompts are made of ("segments"): 20 questions after
    # one 2,000-token system prompt share it, and the cache takes it from the first
    path = tmp_path / "shared.jsonl"
    path.write_text(
        "".join(
            f'{{"arrival_s": {i}, "prompt_tokens": 2100, "output_tokens": 20, '
            f'"segments": [["system", 2000], ["q{i}", 100]]}}\n'
            for i in range(20)
        )
    )
    args = ["replay", str(path), *ARGS, "--memory", "4GiB", "--prefix-cache", "avmp"]
    assert main(args) == 0
    summary = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("avmp: prefix")
    )
    hit, reusable = (int(n) for n in summary.split(": ", 2)[2].split(" reusable")[0].split(" of "))
    assert reusable == 19 * 2000 and hit >= 0.9 * reusable
