from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from avmp.bench.sweep import LAYOUTS, CellSpec, SweepGrid, run_sweep

# Jamba-1.5-Mini on the H200 profile: its 96 GiB of weights would not fit an 80 GB H100.
GRID = SweepGrid(
    workloads=("uniform_short", "shift"), models=("jamba-1.5-mini",),
    budgets_bytes=(1 << 30,), profiles=("h200",), seeds=(0, 1),
    num_requests=(("uniform_short", 12), ("shift", 12)),
)


def _deterministic(record: dict[str, Any]) -> dict[str, Any]:
    result = {k: v for k, v in record["result"].items() if not k.startswith("measured_")}
    assert record["cost"]["cpu_s"] >= 0
    return {**{k: v for k, v in record.items() if k != "cost"}, "result": result}


def _saved(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: _deterministic(json.loads(p.read_text()))
            for p in sorted((directory / "cells").glob("*.json"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grid run once, uninterrupted, in-process."""
    directory = tmp_path_factory.mktemp("reference")
    run_sweep(GRID, directory, workers=1, progress=False)
    return directory


def test_every_cell_saved_once_with_shared_traces(reference: Path) -> None:
    saved = _saved(reference)
    assert sorted(saved) == sorted(c.cell_id for c in GRID.cells())
    assert len(saved) == len(LAYOUTS) * 2 * 2
    by_trace: dict[tuple[str, int], set[str]] = {}
    for record in saved.values():
        key = (record["cell"]["workload"], record["cell"]["seed"])
        by_trace.setdefault(key, set()).add(record["trace"]["sha256"])
        assert record["result"]["allocator"] == record["cell"]["allocator"]
        assert record["trace"]["num_requests"] == 12
    assert all(len(digests) == 1 for digests in by_trace.values())
    assert len({d for ds in by_trace.values() for d in ds}) == 4


def test_killed_sweep_resumes_to_the_same_results(reference: Path, tmp_path: Path) -> None:
    subset = SweepGrid(**{**GRID.__dict__, "seeds": (1,), "allocators": ("avmp", "static")})
    run_sweep(subset, tmp_path, workers=1, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    (tmp_path / "cells" / ".shift__x.json.abc.tmp").write_text('{"half": ')  # killed mid-write
    ran: list[str] = []
    run_sweep(GRID, tmp_path, workers=1, progress=False,
              on_result=lambda r: ran.append(r["cell"]["cell_id"]))
    assert len(ran) == len(GRID.cells()) - len(subset.cells())
    assert not set(ran) & {n.removesuffix(".json") for n in first}
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")
            if p.name in first} == first
    assert not list((tmp_path / "cells").glob(".*"))
    assert _saved(tmp_path) == _saved(reference)
    ran.clear()
    assert run_sweep(GRID, tmp_path, workers=1, progress=False, on_result=ran.append) == 0
    assert ran == []


def test_worker_processes_give_the_same_results(reference: Path, tmp_path: Path) -> None:
    run_sweep(GRID, tmp_path, workers=2, progress=False)
    assert _saved(tmp_path) == _saved(reference)


def test_other_settings_in_the_same_directory_are_refused(reference: Path, tmp_path: Path) -> None:
    small = SweepGrid(**{**GRID.__dict__, "workloads": ("uniform_short",), "seeds": (0,)})
    run_sweep(small, tmp_path, workers=1, progress=False)
    changed = SweepGrid(**{**small.__dict__, "num_requests": (("uniform_short", 13),)})
    with pytest.raises(ValueError, match="made with other num_requests"):
        run_sweep(changed, tmp_path, workers=1, progress=False)


def test_results_of_other_simulator_code_are_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    small = SweepGrid(**{**GRID.__dict__, "workloads": ("uniform_short",), "seeds": (0,)})
    run_sweep(small, tmp_path, workers=1, progress=False)
    monkeypatch.setattr("avmp.bench.sweep.simulator_digest", lambda: "edited-simulator")
    with pytest.raises(ValueError, match="made with other simulator"):
        run_sweep(small, tmp_path, workers=1, progress=False)


def test_grid_validation() -> None:
    with pytest.raises(ValueError, match="unknown allocator"):
        SweepGrid(allocators=("avmp", "lru"))
    with pytest.raises(ValueError, match="include the avmp"):
        SweepGrid(allocators=("static",))
    with pytest.raises(ValueError, match="unknown workload"):
        SweepGrid(workloads=("nope",))
    with pytest.raises(ValueError, match="at least one"):
        SweepGrid(seeds=())
    cell = CellSpec("shift", "a/b c", 3 << 29, "h100", 2, "avmp")
    assert cell.cell_id == "shift__a-b-c__1p5GiB__h100__s2__avmp"


def test_ray_without_ray_is_a_clear_error(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    small = SweepGrid(**{**GRID.__dict__, "workloads": ("uniform_short",), "seeds": (0,)})
    with pytest.raises(ValueError, match="pip install"):
        run_sweep(small, tmp_path, ray_address="auto", progress=False)


def test_sigkilled_sweep_resumes_to_the_same_results(reference: Path, tmp_path: Path) -> None:
    """A sweep process killed with SIGKILL mid-run (no cleanup at all) resumes to the
    results of the uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from avmp.bench import sweep\n"
        "real = sweep.run_cell\n"
        "def slow(task):\n"
        "    time.sleep(0.3)\n"
        "    return real(task)\n"
        "sweep.run_cell = slow\n"
        f"grid = sweep.SweepGrid(**{GRID.__dict__!r})\n"
        "sweep.run_sweep(grid, sys.argv[1], workers=1, progress=False)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    cells_dir = tmp_path / "cells"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(cells_dir.glob("*.json"))) < 3:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list(cells_dir.glob("*.json")))
    assert 3 <= done_before < len(GRID.cells())
    run_sweep(GRID, tmp_path, workers=1, progress=False)
    assert _saved(tmp_path) == _saved(reference)



def test_a_corrupt_or_foreign_cell_is_run_again_and_said_once(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_sweep(GRID, tmp_path, workers=1, progress=False)
    cells = sorted((tmp_path / "cells").glob("*.json"))
    cells[0].write_text('{"cell": ')  # truncated by hand
    cells[1].write_text("[1, 2]")  # well-formed JSON of the wrong shape
    cells[2].write_text(cells[3].read_text())  # another cell's record
    capsys.readouterr()
    ran: list[str] = []
    run_sweep(GRID, tmp_path, workers=1, progress=False,
              on_result=lambda r: ran.append(r["cell"]["cell_id"]))
    assert sorted(ran) == sorted(p.stem for p in cells[:3])
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "3 saved cell file(s)" in err
    assert _saved(tmp_path) == _saved(reference)


def test_cell_files_take_the_umask_permissions(tmp_path: Path) -> None:
    """Not mkstemp's 0600: results in a shared folder stay readable by the group."""
    small = SweepGrid(**{**GRID.__dict__, "workloads": ("shift",), "seeds": (0,),
                         "allocators": ("avmp",)})
    old = os.umask(0o022)
    try:
        run_sweep(small, tmp_path, workers=1, progress=False)
    finally:
        os.umask(old)
    (cell,) = (tmp_path / "cells").glob("*.json")
    assert stat.S_IMODE(cell.stat().st_mode) == 0o644


def test_a_full_disk_names_the_cell_file_and_keeps_the_finished_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved: list[str] = []

    def fsync(fd: int) -> None:
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append("x")

    monkeypatch.setattr("avmp.bench.files.os.fsync", fsync)
    with pytest.raises(OSError) as info:
        run_sweep(GRID, tmp_path, workers=1, progress=False)
    assert info.value.strerror == "No space left on device"
    assert str(info.value.filename).startswith(str(tmp_path / "cells"))
    assert str(info.value.filename).endswith(".json")
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2
    assert not list((tmp_path / "cells").glob(".*"))  # no temporary file left


def test_out_naming_a_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        run_sweep(GRID, target, workers=1, progress=False)
    with pytest.raises(ValueError, match="more than 100,000"):
        SweepGrid(seeds=tuple(range(30_000)))


# -- feasibility, SSM dtype and the static layout's shipped options ------------------


def test_infeasible_cells_are_skipped_and_listed() -> None:
    grid = SweepGrid(
        workloads=("shift",), models=("jamba-1.5-mini", "granite-4.0-h-micro"),
        budgets_bytes=(1 << 30, 12 << 30), profiles=("rtx3060", "h100"), seeds=(0,),
    )
    skipped = {(m, b >> 30, p) for m, b, p, _ in grid.skipped_cells()}
    assert skipped == {
        ("jamba-1.5-mini", 1, "rtx3060"), ("jamba-1.5-mini", 12, "rtx3060"),
        ("jamba-1.5-mini", 1, "h100"), ("jamba-1.5-mini", 12, "h100"),
        ("granite-4.0-h-micro", 12, "rtx3060"),  # 5.9 GiB of weights + a 12 GiB cache
    }
    kept = {(c.model, c.budget_bytes >> 30, c.profile) for c in grid.cells()}
    assert kept == {("granite-4.0-h-micro", 1, "rtx3060"), ("granite-4.0-h-micro", 1, "h100"),
                    ("granite-4.0-h-micro", 12, "h100")}
    assert "cannot run on" in grid.skipped_cells()[0][3]
    every = SweepGrid(**{**_fields(grid), "ignore_feasibility": True})
    assert every.skipped_cells() == [] and len(every.cells()) == 2 * 2 * 2 * len(LAYOUTS)


def _fields(grid: SweepGrid) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(grid, f.name) for f in fields(grid)}


def test_skipping_does_not_change_a_feasible_cells_figures(tmp_path: Path) -> None:
    grid = SweepGrid(
        workloads=("shift",), models=("granite-4.0-h-micro",), budgets_bytes=(1 << 30,),
        profiles=("h100", "rtx3060"), seeds=(0,), num_requests=(("shift", 12),),
    )
    run_sweep(grid, tmp_path / "a", workers=1, progress=False)
    run_sweep(SweepGrid(**{**_fields(grid), "ignore_feasibility": True}), tmp_path / "b",
              workers=1, progress=False)
    assert _saved(tmp_path / "a") == _saved(tmp_path / "b")


def test_ssm_dtype_and_static_options_reach_the_cells(tmp_path: Path) -> None:
    base = SweepGrid(
        workloads=("shift",), models=("nemotron-h-8b",), budgets_bytes=(1 << 30,),
        profiles=("h100",), seeds=(0,), num_requests=(("shift", 24),),
        allocators=("avmp", "static"),
    )
    runs = {}
    for label, change in (("base", {}), ("fp32", {"ssm_dtype": "float32"}),
                          ("auto", {"ssm_dtype": "auto"}),
                          ("capped", {"static_options": ("radix_cache_cap",)})):
        run_sweep(SweepGrid(**{**_fields(base), **change}), tmp_path / label, workers=1,
                  progress=False)
        runs[label] = {k.rsplit("__", 1)[1]: v for k, v in _saved(tmp_path / label).items()}
    assert runs["fp32"]["avmp"]["settings"]["ssm_dtype"] == "float32"
    assert runs["fp32"]["avmp"]["result"] != runs["base"]["avmp"]["result"]
    assert runs["auto"]["avmp"]["result"] == runs["fp32"]["avmp"]["result"]
    assert runs["capped"]["avmp"]["result"] == runs["base"]["avmp"]["result"]
    assert runs["capped"]["static"]["result"] != runs["base"]["static"]["result"]
    with pytest.raises(ValueError, match="unknown static option 'nope'"):
        SweepGrid(static_options=("nope",))
    with pytest.raises(ValueError, match="--ssm-dtype must be one of"):
        SweepGrid(ssm_dtype="int4")


def test_the_simulator_digest_covers_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler change changes cells' results, so it must change the digest."""
    import avmp.sched.scheduler
    from avmp.bench import sweep

    before = sweep.simulator_digest()
    sweep.simulator_digest.cache_clear()
    real = Path.read_bytes
    target = Path(avmp.sched.scheduler.__file__)

    def edited(path: Path) -> bytes:
        data = real(path)
        return data + b"# edited" if path == target else data

    monkeypatch.setattr(Path, "read_bytes", edited)
    try:
        assert sweep.simulator_digest() != before
    finally:
        sweep.simulator_digest.cache_clear()


def test_layouts_that_complete_different_requests_are_rerun_on_the_common_ones(
    tmp_path: Path,
) -> None:
    """Static's split cannot hold mixed_long's longest prompts at 1 GiB and rejects them;
    each layout is then replayed on only the requests every layout completed, and the
    report's same-work figure reads those reruns."""
    from avmp.bench.stats import load_cells, metric_values

    grid = SweepGrid(
        workloads=("mixed_long",), models=("nemotron-h-8b",), budgets_bytes=(1 << 30,),
        profiles=("h100",), seeds=(0,), allocators=("avmp", "static", "unified"),
        num_requests=(("mixed_long", 24),),
    )  # fmt: skip
    assert run_sweep(grid, tmp_path, workers=1, progress=False) == 6
    saved = _saved(tmp_path)
    originals = {c.allocator: saved[c.cell_id] for c in grid.cells()}
    done = {a: set(r["result"]["completed_requests"]["request_id"]) for a, r in originals.items()}
    common = set.intersection(*done.values())
    assert done["static"] == common and done["avmp"] != common  # static rejected some
    for cell in grid.cells():
        rerun = saved[f"{cell.cell_id}__same-work"]
        assert rerun["cell"]["same_work"] is True
        assert rerun["trace"]["num_requests"] == len(common)
        assert set(rerun["result"]["completed_requests"]["request_id"]) == common
        assert rerun["settings"] == originals[cell.allocator]["settings"]
    assert run_sweep(grid, tmp_path, workers=1, progress=False) == 0  # resumes: nothing new
    cells = load_cells(tmp_path)
    assert sorted(c["cell"]["cell_id"] for c in cells) == sorted(c.cell_id for c in grid.cells())
    same = metric_values(cells, "same_work_request_throughput")
    for cell, value in zip(cells, same, strict=True):
        assert value == pytest.approx(cell["same_work"]["result"]["request_throughput"])
    # on the same work AVMP is not slower than the split that rejected the long prompts
    by_layout = {c["cell"]["allocator"]: v for c, v in zip(cells, same, strict=True)}
    assert by_layout["avmp"] >= by_layout["static"]


def test_layouts_that_complete_the_same_requests_are_not_rerun(reference: Path) -> None:
    assert not [name for name in _saved(reference) if name.endswith("same-work")]
