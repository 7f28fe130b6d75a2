"""``avmp replay``'s same-work comparison: where the allocators completed different
requests, each replays again on only the requests all of them completed, from the same
arrivals, as ``avmp bench`` reruns its cells; the same figures either way, in processes
too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import main

ALLOCATORS = ("avmp", "static", "unified")
# Static's split cannot hold mixed_long's longest prompts at 1 GiB and rejects them;
# AVMP and unified serve them (as tests/bench/test_sweep.py's rerun test).
ARGV = ["--model", "nemotron-h-8b", "--memory", "1GiB", "--allocators", ",".join(ALLOCATORS)]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "mixed_long.jsonl"
    write_jsonl(make_workload("mixed_long", 0, num_requests=24), path)
    return path


def _replayed(trace: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict]:
    assert main(["replay", str(trace), *ARGV, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _sizes_replayed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of requests of each `run_replays` call from now on (still run)."""
    from avmp.cli import replay as replay_cli

    sizes: list[int] = []
    real = replay_cli.run_replays

    def counted(tasks, inputs, workers, progress):  # type: ignore[no-untyped-def]
        sizes.append(len(inputs.requests))
        return real(tasks, inputs, workers, progress)

    monkeypatch.setattr(replay_cli, "run_replays", counted)
    return sizes


def test_unlike_work_is_rerun_on_the_common_requests_as_bench_does(
    trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from avmp.bench.stats import load_cells, metric_values
    from avmp.bench.sweep import SweepGrid, run_sweep

    sizes = _sizes_replayed(monkeypatch)
    results = _replayed(trace, capsys, "--workers", "1")
    done = {r["allocator"]: set(r["completed_requests"]["request_id"]) for r in results}
    common = set.intersection(*done.values())
    assert done["static"] == common != done["avmp"]  # static rejected long prompts
    assert sizes == [24, len(common)]  # the trace, then the common requests once more
    grid = SweepGrid(
        workloads=("mixed_long",), models=("nemotron-h-8b",), budgets_bytes=(1 << 30,),
        profiles=("h100",), seeds=(0,), allocators=ALLOCATORS,
        num_requests=(("mixed_long", 24),),
    )  # fmt: skip
    run_sweep(grid, tmp_path / "sweep", workers=1, progress=False)
    cells = load_cells(tmp_path / "sweep")
    same = metric_values(cells, "same_work_request_throughput")
    bench = {c["cell"]["allocator"]: value for c, value in zip(cells, same, strict=True)}
    assert {r["allocator"]: r["same_work_request_throughput"] for r in results} == bench
    by_layout = {r["allocator"]: r for r in results}
    # the rerun, not the first run's figure: AVMP's req/s on the common requests alone
    # is not its req/s over the whole trace, nor over them inside it
    avmp = by_layout["avmp"]
    assert avmp["same_work_request_throughput"] not in (
        avmp["request_throughput"], avmp["common_request_throughput"])  # fmt: skip
    assert (
        avmp["same_work_request_throughput"] >= by_layout["static"]["same_work_request_throughput"]
    )


def test_the_table_shows_the_same_requests_beside_all_completed(
    trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _replayed(trace, capsys)
    assert main(["replay", str(trace), *ARGV]) == 0
    out = capsys.readouterr().out
    common = len(set.intersection(*(set(r["completed_requests"]["request_id"]) for r in results)))
    assert f"same requests: each allocator replayed again on only those {common}, " in out
    header = next(line for line in out.splitlines() if line.startswith("| allocator"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    at = columns.index("req/s, same requests")
    assert (
        columns[at - 1] == "vs avmp, all completed" and columns[at + 1] == "vs avmp, same requests"
    )
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ") and line != header}  # fmt: skip
    for result in results:
        row = rows[result["allocator"]]
        assert row[at] == f"{result['same_work_request_throughput']:.3f}"
    ratio = results[1]["same_work_request_throughput"] / results[0]["same_work_request_throughput"]
    assert rows["avmp"][at + 1] == "1.00x" and rows["static"][at + 1] == f"{ratio:.2f}x"


def test_workers_run_the_reruns_too_with_the_same_results(
    trace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from avmp.cli import replay as replay_cli

    def figures(results: list[dict]) -> list[tuple[float, float]]:
        return [(r["request_throughput"], r["same_work_request_throughput"]) for r in results]

    alone = figures(_replayed(trace, capsys, "--workers", "1"))
    on_processes: list[int] = []
    real = replay_cli._replay_on_processes

    def watched(tasks, inputs, workers, progress):  # type: ignore[no-untyped-def]
        on_processes.append(len(inputs.requests))
        return real(tasks, inputs, workers, progress)

    monkeypatch.setattr(replay_cli, "_replay_on_processes", watched)
    assert figures(_replayed(trace, capsys, "--workers", "2")) == alone
    assert on_processes[0] == 24 and len(on_processes) == 2 and on_processes[1] < 24


def test_like_work_is_not_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    path = tmp_path / "shift.jsonl"
    write_jsonl(make_workload("shift", 0, num_requests=12), path)
    sizes = _sizes_replayed(monkeypatch)
    results = _replayed(path, capsys)
    assert sizes == [12]
    assert all(r["num_completed"] == 12 for r in results)
    assert [r["same_work_request_throughput"] for r in results] == [
        r["request_throughput"] for r in results]  # fmt: skip
