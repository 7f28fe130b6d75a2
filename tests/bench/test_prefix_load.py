"""`benchmarks/prefix_load.py`: TTFT with and without the prefix cache across loads in
the simulator, the engine's runs beside, and one line for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import prefix_load
from benchmarks.common import read_result, write_result

SMALL = ["--workloads", "multi_turn_prefix", "--num-requests", "24", "--arrival-scales", "1", "0.2"]


def _engine_file(path: Path, scale: float) -> Path:
    """A `prefix_engine` results file: AVMP's pools without and with the cache."""
    def run(cache: str, p50: float) -> dict:
        return {"workload": "multi_turn_prefix", "allocator": "avmp", "prefix_cache": cache,
                "num_requests": 24, "ttft_p50_s": p50, "ttft_p99_s": 4 * p50,
                "request_throughput": 9.0}  # fmt: skip

    results = {"device": "NVIDIA H200", "arrival_scale": scale,
               "runs": [run("off", 0.030), run("avmp", 0.010),
                        {**run("off", 0.5), "allocator": "static"}]}  # fmt: skip
    return write_result(path, results)


def test_a_sweep_writes_every_load_and_puts_the_engine_beside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine_file(tmp_path / "engine.json", 0.2)
    out, png = tmp_path / "load.json.gz", tmp_path / "load.png"
    argv = [*SMALL, "--engine", str(engine), "--out", str(out), "--plot", str(png)]
    assert prefix_load.main(argv) == 0
    table = capsys.readouterr().out
    results = read_result(out)
    assert [p["arrival_scale"] for p in results["points"]] == [1.0, 0.2]
    for point in results["points"]:
        assert point["off"]["num_completed"] == point["on"]["num_completed"] == 24
        assert "hit_of_ideal" in point["on"] and "hit_of_ideal" not in point["off"]
    dense, light = results["points"][1], results["points"][0]
    assert dense["offered_rps"] == pytest.approx(5 * light["offered_rps"])
    rows = [line for line in table.splitlines() if line.startswith("| multi_turn_prefix")]
    assert len(rows) == 2
    assert rows[1].endswith("| 30.0 ms / 10.0 ms (3.00x) |")  # the engine's, at its scale
    assert rows[0].endswith("| - |")
    assert results["overlap"] and "planned while the previous step runs" in table
    assert png.stat().st_size > 10_000
    # the table again from the file, another engine run given instead
    other = _engine_file(tmp_path / "other.json", 1.0)
    assert prefix_load.main(["--markdown", str(out), "--engine", str(other)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| multi_turn_prefix" in line]
    assert rows[0].endswith("(3.00x) |") and rows[1].endswith("| - |")


def test_plans_between_steps_answer_sooner(tmp_path: Path) -> None:
    ttft = {}
    for extra in ([], ["--no-overlap"]):
        out = tmp_path / f"r{len(extra)}.json"
        assert prefix_load.main([*SMALL, *extra, "--out", str(out)]) == 0
        ttft[bool(extra)] = read_result(out)["points"][0]["off"]["ttft_p50_s"]
    assert ttft[True] < ttft[False]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workloads", "chat"], "unknown workload 'chat'"),
        (["--arrival-scales", "0"], "--arrival-scales must be > 0"),
        (["--num-requests", "0"], "--num-requests must be >= 1"),
        (["--calibration", "nope.json"], "no calibration file nope.json"),
        (["--engine", "nope.json"], "no results file nope.json"),
        (["--markdown", "nope.json"], "no results file nope.json"),
    ],
)
def test_a_mistake_is_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert prefix_load.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_engine_file_of_another_kind_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_result(tmp_path / "identity.json", {"mode": "identity", "runs": []})
    assert prefix_load.main([*SMALL, "--engine", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a timed run of benchmarks/prefix_engine.py" in err and err.count("\n") == 1
