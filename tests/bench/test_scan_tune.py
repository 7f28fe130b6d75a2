"""benchmarks/scan_tune.py and its sweep (scan_tune_measure.py) off the GPU: the geometries
it reads from the zoo, its candidate grid, pruning, checking and picking (with fake steps
and a fake timer), the tuned table it writes, its report, its refusal without CUDA; and one
small sweep of the real code path on the CPU under Triton's interpreter (wall-clock times).

Like the kernel tests it needs Triton on a CUDA device or under the interpreter
(``AVMP_TRITON_INTERPRET=1``): `kernel_device` switches the interpreter on before Triton's
first import, so the kernel tests later in the session still can."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.mamba2_chunk_scan import (  # noqa: E402
    SCAN_KERNELS,
    CbTiles,
    ChunkScanTiles,
    DtCumsumTiles,
    KernelTiles,
    ScanTiles,
    StatePassingTiles,
    parse_tuned_table,
    tuned_tiles,
)
from benchmarks import scan_tune, scan_tune_measure, tuning  # noqa: E402
from benchmarks.common import read_result  # noqa: E402
from benchmarks.kernels_measure import SCAN_GEOMETRIES, ScanGeometry  # noqa: E402
from benchmarks.scan_tune_measure import Grid, Trial  # noqa: E402

GRANITE = scan_tune_measure.scan_geometry("granite-4.0-h-micro")
GRID = Grid()


def test_geometries_come_from_the_zoo() -> None:
    for model in scan_tune.MODELS:
        assert scan_tune_measure.scan_geometry(model) == SCAN_GEOMETRIES[model]
    assert scan_tune_measure.zoo_target("nemotron-h-8b").state_dtype == torch.float32
    with pytest.raises(ValueError, match="no Mamba2 mixer keys known for model_type 'jamba'"):
        scan_tune_measure.scan_geometry("jamba-1.5-mini")


# -- candidates --------------------------------------------------------------------------------


def test_tile_axes_keep_sizes_that_divide_and_fit() -> None:
    assert scan_tune_measure.fitting(64, (32, 64, 128)) == (32, 64)
    assert scan_tune_measure.fitting(96, (32, 64, 128)) == (32,)
    axes = {k: scan_tune_measure.tile_axes(k, GRANITE, GRID) for k in SCAN_KERNELS}
    assert axes["dt_cumsum"] == {"block_heads": (4, 8, 16)}
    assert axes["cb"] == {"block_tokens": (32, 64, 128), "block_state": (32, 64, 128)}
    assert axes["chunk_state"]["block_p"] == (32, 64)  # head_dim 64: 128 does not fit
    assert axes["state_passing"] == {"block_flat": (128, 256, 512, 1024, 2048, 4096),
                                     "prefetch": (1, 2)}
    tiny = ScanGeometry(heads=2, head_dim=16, d_state=16, groups=1, chunk_size=8)
    # below every choice: the default, which the launch shrinks to the dimension
    assert scan_tune_measure.tile_axes("chunk_scan", tiny, GRID) == {
        "block_tokens": (64,), "block_p": (64,), "block_state": (64,), "block_j": (64,)}
    assert scan_tune_measure.tile_axes("dt_cumsum", tiny, GRID) == {"block_heads": (8,)}


def test_phase_one_is_every_tile_combination_with_the_default_first() -> None:
    cands = scan_tune_measure.phase_one("chunk_scan", GRANITE, GRID)
    assert cands[0] == ChunkScanTiles()
    assert len(cands) == len(set(cands)) == 3 * 2 * 3 * 3
    assert {(c.num_warps, c.num_stages) for c in cands} == {(4, 3)}
    off_grid = Grid(tile_sizes=(32,))  # the default's 64 is not in it: timed anyway
    cands = scan_tune_measure.phase_one("cb", GRANITE, off_grid)
    assert cands == [CbTiles(), CbTiles(block_tokens=32, block_state=32)]


def test_phase_two_varies_warps_and_stages_around_the_best() -> None:
    best = CbTiles(block_tokens=128, block_state=32)
    cands = scan_tune_measure.phase_two("cb", best, GRID)
    assert len(cands) == 2 * 3 - 1 and best not in cands
    assert {(c.block_tokens, c.block_state) for c in cands} == {(128, 32)}
    assert {(c.num_warps, c.num_stages) for c in cands} == {
        (4, 1), (4, 2), (8, 1), (8, 2), (8, 3)}
    # the dt cumsum has no loop to pipeline, the state passing none Triton pipelines
    assert scan_tune_measure.phase_two("dt_cumsum", DtCumsumTiles(), GRID) == [
        DtCumsumTiles(num_warps=8)]
    passing = StatePassingTiles(block_flat=256, prefetch=1)
    assert scan_tune_measure.phase_two("state_passing", passing, GRID) == [
        dataclasses.replace(passing, num_warps=w) for w in (2, 8)]


def test_shared_memory_bound() -> None:
    tiles = ChunkScanTiles(block_tokens=128, block_p=64, block_state=128, block_j=128)
    per_stage = max(128 * 128 * 2 + 128 * 64 * 2, 128 * 128 * 4 + 128 * 64 * 2)
    assert scan_tune_measure.smem_lower_bound("chunk_scan", tiles, GRANITE) == 2 * per_stage
    one = dataclasses.replace(tiles, num_stages=1)
    assert scan_tune_measure.smem_lower_bound("chunk_scan", one, GRANITE) == per_stage
    # the sources' loop stages a [rows, j] CB tile and a [j, p] x tile
    wide = dataclasses.replace(tiles, block_tokens=32, block_state=32, block_j=256)
    per_stage = max(32 * 32 * 2 + 32 * 64 * 2, 32 * 256 * 4 + 256 * 64 * 2)
    assert scan_tune_measure.smem_lower_bound("chunk_scan", wide, GRANITE) == 2 * per_stage
    # tiles shrink to the shape: a 16-token chunk takes 16-row tiles whatever the cap
    small = ScanGeometry(heads=2, head_dim=16, d_state=16, groups=1, chunk_size=16)
    assert scan_tune_measure.smem_lower_bound("cb", CbTiles(num_stages=2), small) == 2 * 16 * 16 * 2
    assert scan_tune_measure.smem_lower_bound("state_passing", StatePassingTiles(), GRANITE) == 0


# -- checking, timing and picking, with fake steps -------------------------------------------


class FakeCase:
    """A step whose mismatch and launch the test decides; counts what the sweep asks."""

    def __init__(self, label: str, errors: dict[KernelTiles, float] | None = None,
                 broken: KernelTiles | None = None) -> None:
        self.label, self.errors, self.broken = label, errors or {}, broken
        self.calls: list[str] = []

    def mismatch(self, tiles: ScanTiles) -> float:
        self.calls.append("check")
        errors = [self.errors.get(getattr(tiles, k), 1e-4) for k in SCAN_KERNELS]
        return sum(errors) if any(e != e for e in errors) else max(errors)  # NaN stays NaN

    def launch(self, tiles: ScanTiles, kernel: str) -> Callable[[], None]:
        self.calls.append("launch")
        if getattr(tiles, kernel) == self.broken:
            raise RuntimeError("triton compile failed\n  many lines\nout of resources: 300000")
        return lambda: None


def fake_timer(ms: float) -> scan_tune_measure.Timer:
    return lambda fn: (fn(), ms)[1]


def test_try_candidate_times_checks_prunes_and_records_failures() -> None:
    cases = [FakeCase("1 x 8"), FakeCase("2 x 4")]
    good = CbTiles(block_tokens=32)
    trial = scan_tune_measure.try_candidate("cb", good, cases, fake_timer(0.5), GRANITE, 1 << 20)
    assert trial.ok and trial.ms == (0.5, 0.5) and trial.total_ms == 1.0
    assert trial.rel_error == 1e-4 and cases[0].calls == ["check", "launch"]

    wrong = CbTiles(block_tokens=128)
    cases = [FakeCase("1 x 8", errors={wrong: 0.3}), FakeCase("2 x 4")]
    trial = scan_tune_measure.try_candidate("cb", wrong, cases, fake_timer(0.1), GRANITE, 1 << 20)
    assert not trial.ok and trial.error == "mismatch on 1 x 8: rel error 3.00e-01"
    assert cases[1].calls == []  # rejected on the first step
    nan = scan_tune_measure.try_candidate("cb", wrong,
                                          [FakeCase("s", errors={wrong: float("nan")})],
                                          fake_timer(0.1), GRANITE, 1 << 20)
    assert nan.error is not None and nan.error.startswith("mismatch")

    broken = CbTiles(block_state=128)
    trial = scan_tune_measure.try_candidate("cb", broken, [FakeCase("s", broken=broken)],
                                            fake_timer(0.1), GRANITE, 1 << 20)
    assert trial.error == "RuntimeError: out of resources: 300000"

    big = CbTiles(block_tokens=128, block_state=128)
    case = FakeCase("s")
    trial = scan_tune_measure.try_candidate("cb", big, [case], fake_timer(0.1), GRANITE, 100_000)
    assert trial.error == "pruned: needs >= 131072 B of shared memory, the GPU has 100000"
    assert case.calls == []  # never compiled


def test_pick_fastest_skips_failures_and_keeps_the_first_of_equals() -> None:
    a, b, c = CbTiles(), CbTiles(block_tokens=32), CbTiles(block_tokens=128)
    trials = [Trial("cb", a, ms=(1.0, 1.0)), Trial("cb", b, ms=(0.5, 1.5)),
              Trial("cb", c, ms=(0.1, 0.1), error="mismatch")]
    assert scan_tune_measure.pick_fastest(trials) is trials[0]
    assert scan_tune_measure.pick_fastest(trials[1:]) is trials[1]
    assert scan_tune_measure.pick_fastest([trials[2]]) is None


def times_by_tiles(times: dict[tuple[int, int, int], float]) -> Callable[[KernelTiles], Trial]:
    """A fake attempt: a cb candidate's time by (block_tokens, num_warps, num_stages)."""
    def attempt(tiles: KernelTiles) -> Trial:
        assert isinstance(tiles, CbTiles)
        key = (tiles.block_tokens, tiles.num_warps, tiles.num_stages)
        return Trial("cb", tiles, ms=(times.get(key, 5.0),))

    return attempt


def test_sweep_kernel_runs_phase_two_around_phase_one_best() -> None:
    grid = Grid(tile_sizes=(32, 64, 128))
    geo = dataclasses.replace(GRANITE, d_state=64)  # block_state from {32, 64}
    attempt = times_by_tiles({(128, 4, 3): 2.0, (128, 8, 1): 1.0, (32, 8, 2): 0.5})
    trials, skipped = scan_tune_measure.sweep_kernel("cb", geo, grid, attempt, lambda: False)
    assert skipped == 0 and len(trials) == 3 * 2 + 5
    second = trials[6:]
    assert {t.tiles.block_tokens for t in second} == {128}  # around phase 1's best
    best = scan_tune_measure.pick_fastest(trials)
    assert best is not None and (best.tiles.block_tokens, best.tiles.num_warps,
                                 best.tiles.num_stages) == (128, 8, 1)


def test_sweep_kernel_stops_at_the_budget_but_times_the_default() -> None:
    attempt = times_by_tiles({})
    trials, skipped = scan_tune_measure.sweep_kernel("cb", GRANITE, GRID, attempt, lambda: True)
    assert [t.tiles for t in trials] == [CbTiles()]
    assert skipped == 3 * 3 - 1 + 5
    # the packaged table's tiles run too, second, whatever the budget (off the grid too)
    shipped = CbTiles(block_tokens=16, num_warps=8)
    assert scan_tune_measure.phase_one("cb", GRANITE, GRID, shipped)[:2] == [CbTiles(), shipped]
    trials, skipped = scan_tune_measure.sweep_kernel("cb", GRANITE, GRID, attempt, lambda: True,
                                                     shipped)
    assert [t.tiles for t in trials] == [CbTiles(), shipped]
    assert skipped == 3 * 3 - 1 + 5
    # shipped tiles that are the defaults add nothing
    trials, _ = scan_tune_measure.sweep_kernel("cb", GRANITE, GRID, attempt, lambda: True,
                                               CbTiles())
    assert [t.tiles for t in trials] == [CbTiles()]
    # phase 2: 2 x 3 - 1 for each kernel with matrix products, 2 - 1 warps for the dt
    # cumsum, 3 - 1 for the state passing
    assert scan_tune_measure.grid_size(GRANITE, GRID) == sum(
        len(scan_tune_measure.phase_one(k, GRANITE, GRID)) for k in SCAN_KERNELS) + 3 * 5 + 1 + 2
    assert len(scan_tune_measure.phase_one("state_passing", GRANITE, GRID)) == 1 + 6 * 2 - 1
    assert scan_tune_measure.grid_size(GRANITE, GRID, ["state_passing"]) == 12 + 2


# -- the tuned table and the report ------------------------------------------------------------


def fake_result(device: str = "NVIDIA H200") -> dict[str, Any]:
    tuned = ScanTiles().with_kernel("chunk_scan", ChunkScanTiles(block_tokens=128, num_warps=8))
    geometries = []
    for model, speedup in (("granite-4.0-h-micro", 1.25), ("nemotron-h-8b", 1.1)):
        geometries.append({
            "model": model, "geometry": dataclasses.asdict(SCAN_GEOMETRIES[model]),
            "dtype": "bfloat16", "state_dtype": "float32", "steps": ["1 x 8192", "8 x 1024"],
            "trials": [{"kernel": "chunk_scan", "error": None}, {"kernel": "chunk_scan",
                                                                  "error": "pruned"}],
            "skipped": 0, "tuned": tuned.to_dict(),
            "kernels": [{"kernel": k, "default": getattr(ScanTiles(), k).label(),
                         "tuned": getattr(tuned, k).label(), "default_ms": [0.2, 0.3],
                         "tuned_ms": [0.1, 0.3]} for k in SCAN_KERNELS],
            "whole": [{"step": s, "default_ms": 1.0, "tuned_ms": 1.0 / speedup,
                       "speedup": speedup, "rel_error": 2e-3} for s in ("1 x 8192", "8 x 1024")],
        })  # fmt: skip
    return {"device": device, "torch": "2.x", "triton": "3.6.0",
            "command": "PYTHONPATH=src python3 -m benchmarks.scan_tune --out r.json.gz",
            "timing": scan_tune_measure.TIMING, "elapsed_s": 93.0,
            "geometries": geometries}


def test_table_entries_replace_this_gpus_and_keep_the_rest(tmp_path: Path) -> None:
    new = scan_tune_measure.TABLE.entries(fake_result())
    assert [(e["chunk_size"], e["gpu"]) for e in new] == [(256, "NVIDIA H200"),
                                                          (128, "NVIDIA H200")]
    assert new[0]["speedup"] == {"1 x 8192": 1.25, "8 x 1024": 1.25}
    assert new[0]["command"].startswith("PYTHONPATH=src python3 -m benchmarks.scan_tune")
    older = [dict(new[0], gpu="nvidia h200", tiles={}),  # replaced
             dict(new[0], gpu="NVIDIA H100 80GB HBM3", tiles={})]  # kept
    table = scan_tune_measure.TABLE.merged(older, new)
    assert [e["gpu"] for e in table["entries"]] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200",
                                                    "NVIDIA H200"]
    parsed = parse_tuned_table(table, "t")
    assert tuned_tiles(256, 64, 128, torch.bfloat16, "NVIDIA H200", parsed).chunk_scan == \
        ChunkScanTiles(block_tokens=128, num_warps=8)
    assert tuned_tiles(256, 64, 128, torch.bfloat16, "NVIDIA H100 80GB HBM3",
                       parsed) == ScanTiles()
    with pytest.raises(ValueError, match="a second entry"):
        scan_tune_measure.TABLE.merged([], new + new[:1])

    path = tmp_path / "tuned.json"
    scan_tune_measure.TABLE.write(path, fake_result())
    written = json.loads(path.read_text())
    expected = scan_tune_measure.TABLE.merged(scan_tune_measure.TABLE.packaged_entries(), new)
    assert written == expected and parse_tuned_table(written, str(path))


def test_markdown_tables_come_from_the_result() -> None:
    text = scan_tune.markdown(fake_result())
    assert ("NVIDIA H200, torch 2.x, Triton 3.6.0; 93 s; times: CUDA events around 4 "
            "back-to-back calls, median of 30 after 12 warm-up calls (the sweep: median of "
            "10).") in text
    assert ("| granite-4.0-h-micro | chunk_scan | tokens64 p64 state64 j64 w4 s3 | "
            "tokens128 p64 state64 j64 w8 s3 | 0.200 / 0.100 | 0.300 / 0.300 | 1 / 2 |") in text
    assert "| nemotron-h-8b | 8 x 1024 | 1.000 | 0.909 | 1.10x | 2.0e-03 | 0 |" in text


def test_command_records_paths_without_machine_directories() -> None:
    argv = ["--out", "/tmp/abc/out.json.gz", "--write-table", "/tmp/abc/t.json", "--budget-s",
            "90"]
    assert tuning.command("scan_tune", argv) == (
        "PYTHONPATH=src python3 -m benchmarks.scan_tune --out out.json.gz --write-table t.json "
        "--budget-s 90")


def test_without_cuda_it_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scan_tune.main(["--out", str(tmp_path / "r.json.gz")]) == 2
    err = capsys.readouterr().err
    assert err == "scan_tune: needs a CUDA GPU (none is visible)\n"
    assert not (tmp_path / "r.json.gz").exists()
    assert scan_tune.main(["--models", "jamba-1.5-mini", "--out", "r"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert scan_tune.main(["--kernels", "cb", "bogus", "--out", "r"]) == 2
    assert capsys.readouterr().err == ("scan_tune: --kernels bogus: the scan's kernels are "
                                       f"{', '.join(SCAN_KERNELS)}\n")
    with pytest.raises(SystemExit):
        scan_tune.parse_args(["--steps", "0x8"])


# -- the real code path, small, on the CPU ---------------------------------------------------


def wall_timer(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the GPU runs the script itself")
def test_a_small_sweep_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    geo = ScanGeometry(heads=4, head_dim=32, d_state=32, groups=2, chunk_size=32)
    target = scan_tune_measure.Target("tiny", geo, torch.float32)
    grid = Grid(tile_sizes=(16,), head_blocks=(4,), flat_blocks=(256,), warps=(4, 8),
                stages=(1,))
    rig = tuning.Rig(DEVICE, (wall_timer, wall_timer), "wall clock, one call", 1 << 30)
    setup = scan_tune_measure.Setup(rig, ((2, 24),), 600.0, grid)
    result = scan_tune_measure.run([target], setup, ["--out", "x.json.gz"])
    g = result["geometries"][0]
    assert result["device"] == "cpu" and result["timing"] == "wall clock, one call"
    assert g["steps"] == ["2 x 24"] and g["skipped"] == 0
    assert {t["kernel"] for t in g["trials"]} == set(SCAN_KERNELS)
    assert all(t["error"] is None and t["rel_error"] <= scan_tune_measure.MATCH_TOLERANCE
               for t in g["trials"])
    for kernel in SCAN_KERNELS:
        trials = [t for t in g["trials"] if t["kernel"] == kernel]
        assert trials[0]["label"] == getattr(ScanTiles(), kernel).label()  # the default first
        fastest = min(trials, key=lambda t: sum(t["ms"]))
        assert g["tuned"][kernel] == fastest["tiles"]
    assert [k["kernel"] for k in g["kernels"]] == list(SCAN_KERNELS)
    assert g["whole"][0]["rel_error"] <= scan_tune_measure.MATCH_TOLERANCE
    assert "| tiny | 2 x 24 |" in scan_tune.markdown(result)


def test_trials_table_lists_one_kernels_candidates() -> None:
    result = fake_result()
    passing = StatePassingTiles(prefetch=1)
    result["geometries"][0]["trials"] = [
        Trial("state_passing", passing, ms=(0.05, 0.04), rel_error=0.0).to_dict(),
        Trial("state_passing", StatePassingTiles(block_flat=128), error="mismatch").to_dict(),
        Trial("cb", CbTiles(), ms=(1.0, 1.0)).to_dict()]
    text = scan_tune.trials_markdown(result, "state_passing")
    assert text.splitlines()[0] == ("| model geometry | state_passing tiles | 1 x 8192 ms | "
                                    "8 x 1024 ms | rel err vs default | dropped |")
    assert "| granite-4.0-h-micro | flat1024 ahead1 w4 s3 | 0.050 | 0.040 | 0.0e+00 |  |" in text
    assert "| granite-4.0-h-micro | flat128 ahead2 w4 s3 | - | - | - | mismatch |" in text
    assert "tokens64" not in text and len(text.splitlines()) == 4
    with pytest.raises(ValueError, match="--trials bogus: the result's kernels are dt_cumsum, "):
        scan_tune.trials_markdown(result, "bogus")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="--smoke runs under the interpreter")
def test_a_sweep_of_some_kernels_keeps_the_shipped_tiles_of_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shipped = ScanTiles(cb=CbTiles(block_tokens=16, num_warps=2),
                        state_passing=StatePassingTiles(block_flat=64))
    monkeypatch.setattr(scan_tune_measure, "tuned_tiles", lambda *args: shipped)
    table = tmp_path / "t.json"
    argv = ["--smoke", "--kernels", "state_passing", "--out", str(tmp_path / "r.json.gz"),
            "--write-table", str(table)]
    assert scan_tune.main(argv) == 0
    written = ScanTiles.from_dict(json.loads(table.read_text())["entries"][-1]["tiles"])
    assert written.cb == shipped.cb and written.chunk_scan == shipped.chunk_scan
    # the swept kernel's tiles come from the sweep, which timed the shipped ones too
    result = read_result(tmp_path / "r.json.gz")
    tried = {t["label"] for t in result["geometries"][0]["trials"]}
    assert shipped.state_passing.label() in tried and written.state_passing.label() in tried


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="--smoke runs under the interpreter")
def test_smoke_sweeps_the_state_passing_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "smoke.json.gz"
    assert scan_tune.main(["--smoke", "--kernels", "state_passing", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| smoke | state_passing | flat1024 ahead2 w4 s3 |" in printed
    result = read_result(out)
    g = result["geometries"][0]
    assert g["swept"] == ["state_passing"] and g["steps"] == ["1 x 80", "2 x 24"]
    assert {t["kernel"] for t in g["trials"]} == {"state_passing"}
    labels = [t["label"] for t in g["trials"]]
    assert labels[0] == "flat1024 ahead2 w4 s3" and len(labels) == 4 + 1
    assert {"flat256 ahead1 w4 s3", "flat1024 ahead1 w4 s3"} <= set(labels)
    assert all(t["error"] is None for t in g["trials"])
    assert g["tuned"]["chunk_scan"] == dataclasses.asdict(ChunkScanTiles())  # not swept
    assert scan_tune.main(["--markdown", str(out), "--trials", "state_passing"]) == 0
    assert capsys.readouterr().out.count("| smoke | flat") == 5
