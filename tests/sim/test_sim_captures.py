"""The simulator charges CUDA graph captures met mid-run: a calibration file's capture
costs round-trip, each new graph (a decode graph's rows and width, a mixed graph's
buckets) is charged once in the step that captures it and never again, and calibration
files without capture costs give the results they gave before."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.models.geometry import ModelGeometry
from avmp.models.zoo import resolve_model
from avmp.sched.request import RequestSpec
from avmp.sim.calibration import load_calibration
from avmp.sim.metrics import SimResult
from avmp.sim.simulator import SimConfig, simulate
from avmp.sim.timing import BatchShape, decode_graph_rows, graph_width_tokens
from sched_helpers import MIB

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
DECODE_S, MIXED_S = 0.5, 0.003  # far apart, so that a sum tells the kinds apart


def graphed_points() -> list[dict[str, Any]]:
    """Steps of an engine that runs decode, prefill and mixed steps as graphs."""
    return [
        {"num_prefill_tokens": p, "num_decode_requests": d, "num_context_tokens": c,
         "num_requests": r, "step_s": 0.002 + 1e-5 * p + 2e-5 * d + 1e-8 * c,
         "graph": int(d > 0 and p == 0 or p > 0),
         **({"num_padded_tokens": 2 * (p + d)} if p > 0 else {})}
        for p, d, c, r in ((512, 0, 512, 1), (0, 8, 4000, 8), (0, 32, 9000, 32),
                           (100, 4, 3000, 5), (2048, 0, 2048, 2), (0, 1, 700, 1),
                           (30, 9, 5000, 10))
    ]  # fmt: skip


def write_calibration(path: Path, graph_captures: dict[str, Any] | None) -> Path:
    data: dict[str, Any] = {"gpu": "test", "points": graphed_points()}
    if graph_captures is not None:
        data["graph_captures"] = graph_captures
    path.write_text(json.dumps(data))
    return path


CAPTURES = {
    "decode": {"median_s": DECODE_S, "count": 7},
    "mixed": {"median_s": MIXED_S, "count": 3},
}


def run(
    geometry: ModelGeometry, specs: list[RequestSpec], calibration: Path | None
) -> tuple[SimResult, list[BatchShape]]:
    allocator = make_allocator("avmp", geometry, MemoryConfig(64 * MIB))
    config = SimConfig(allocator_calls_path=None, max_num_batched_tokens=256,
                       calibration=None if calibration is None else str(calibration),
                       charge_graph_captures=True)  # fmt: skip
    shapes: list[BatchShape] = []
    result = simulate(specs, allocator, geometry, config,
                      on_step=lambda shape, _seconds: shapes.append(shape))  # fmt: skip
    return result, shapes


def test_capture_costs_round_trip_and_old_files_cost_nothing(tmp_path: Path) -> None:
    model = load_calibration(write_calibration(tmp_path / "cal.json", CAPTURES))
    assert (model.decode_capture_s, model.mixed_capture_s) == (DECODE_S, MIXED_S)
    assert model.capture_seconds("decode") == DECODE_S
    assert model.capture_seconds("mixed") == MIXED_S
    packed = tmp_path / "cal.json.gz"
    packed.write_bytes(gzip.compress((tmp_path / "cal.json").read_bytes()))
    assert load_calibration(packed) == model
    old = load_calibration(write_calibration(tmp_path / "old.json", None))
    assert (old.decode_capture_s, old.mixed_capture_s) == (0.0, 0.0)
    assert old.coefficients == model.coefficients
    only_decode = {"decode": CAPTURES["decode"]}
    one = load_calibration(write_calibration(tmp_path / "one.json", only_decode))
    assert (one.decode_capture_s, one.mixed_capture_s) == (DECODE_S, 0.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"decode": {"median_s": -0.1, "count": 3}},
        {"decode": {"median_s": float("nan"), "count": 3}},
        {"mixed": {"median_s": 0.1, "count": 0}},
        {"mixed": {"count": 2}},
        {"prefill": {"median_s": 0.1, "count": 2}},
        {"decode": 0.1},
        [0.1, 0.2],
    ],
)
def test_bad_capture_costs_are_one_line_naming_the_file(tmp_path: Path, bad: Any) -> None:
    path = write_calibration(tmp_path / "bad.json", bad)
    with pytest.raises(ValueError, match="bad.json: not a valid step-time calibration"):
        load_calibration(path)


def test_each_new_graph_is_charged_once_in_the_step_that_captures_it(
    geometry: ModelGeometry, tmp_path: Path
) -> None:
    """One request of 100 prompt and 300 output tokens: its prefill step captures a
    mixed graph, its decodes a graph of one row at 256 tokens of block table and one at
    512 (contexts up to 400 tokens); every other step replays one. The first token comes
    the mixed capture later, the last all three captures later."""
    specs = [RequestSpec(0, 0.0, 100, 300)]
    free, _ = run(geometry, specs, write_calibration(tmp_path / "free.json", None))
    charged, shapes = run(geometry, specs, write_calibration(tmp_path / "cal.json", CAPTURES))
    assert charged.num_steps == free.num_steps == len(shapes) == 300
    assert (free.num_graph_captures, free.graph_capture_s) == (3, 0.0)  # counted, not charged
    assert charged.num_graph_captures == 3
    assert charged.graph_capture_s == pytest.approx(2 * DECODE_S + MIXED_S)
    assert charged.ttft_p50_s - free.ttft_p50_s == pytest.approx(MIXED_S)
    assert charged.makespan_s - free.makespan_s == pytest.approx(2 * DECODE_S + MIXED_S)
    assert charged.phase_s == free.phase_s  # a capture is no phase: the engine's is apart
    widths = {graph_width_tokens(s.longest_context_tokens) for s in shapes[1:]}
    assert widths == {256, 512}
    recorded = charged.to_dict()
    assert (recorded["num_graph_captures"], recorded["graph_capture_s"]) == (
        3, pytest.approx(2 * DECODE_S + MIXED_S)
    )  # fmt: skip


def test_the_steps_that_capture_are_timed_apart_as_the_engine_times_them(
    geometry: ModelGeometry, tmp_path: Path
) -> None:
    """The engine leaves a capturing step out of its timed span whole, capture and run
    (benchmarks/engine_replay.py); the simulator reports those steps' compute seconds
    apart (``captured_steps_s``), charged or not: here the prefill step and the first
    decode step at each block-table width, priced by the calibration."""
    specs = [RequestSpec(0, 0.0, 100, 300)]
    calibration = write_calibration(tmp_path / "cal.json", CAPTURES)
    allocator = make_allocator("avmp", geometry, MemoryConfig(64 * MIB))
    config = SimConfig(allocator_calls_path=None, max_num_batched_tokens=256,
                       calibration=str(calibration), charge_graph_captures=True)  # fmt: skip
    priced: list[tuple[BatchShape, float]] = []
    result = simulate(specs, allocator, geometry, config,
                      on_step=lambda shape, seconds: priced.append((shape, seconds)))  # fmt: skip
    first_of_width: dict[int, float] = {}
    for shape, seconds in priced[1:]:
        first_of_width.setdefault(graph_width_tokens(shape.longest_context_tokens), seconds)
    expected = priced[0][1] + sum(first_of_width.values())
    assert result.num_graph_captures == 1 + len(first_of_width) == 3
    assert result.captured_steps_s == pytest.approx(expected)
    assert 0 < result.captured_steps_s < result.phase_s["compute"]
    assert result.to_dict()["captured_steps_s"] == pytest.approx(expected)
    free, _ = run(geometry, specs, write_calibration(tmp_path / "free.json", None))
    assert free.captured_steps_s == pytest.approx(expected)  # the steps, not the charge
    roofline, _ = run(geometry, specs, None)
    assert roofline.captured_steps_s == 0.0 and "captured_steps_s" not in roofline.to_dict()


def test_a_busy_run_is_charged_per_new_bucket_never_per_step(
    geometry: ModelGeometry, tmp_path: Path
) -> None:
    """Many requests at t = 0 (the schedule then does not depend on the clock): the
    charged run takes the same steps, and its extra time is a decode capture per
    distinct (rows, width) of its decode steps and a mixed capture per bucket first
    met, counted here from the steps themselves."""
    rng = np.random.default_rng(3)
    specs = [RequestSpec(i, 0.0, int(rng.integers(20, 600)), int(rng.integers(2, 120)))
             for i in range(24)]  # fmt: skip
    free, free_shapes = run(geometry, specs, write_calibration(tmp_path / "free.json", None))
    charged, shapes = run(geometry, specs, write_calibration(tmp_path / "cal.json", CAPTURES))
    assert shapes == free_shapes
    decode_keys = {
        (s.num_graph_rows, graph_width_tokens(s.longest_context_tokens))
        for s in shapes
        if s.num_prefill_tokens == 0 and s.num_graph_rows
    }
    num_decode_steps = sum(1 for s in shapes if s.num_prefill_tokens == 0)
    num_mixed = _mixed_captures(shapes)
    assert num_decode_steps > len(decode_keys) > 1 and num_mixed > 1
    assert charged.num_graph_captures == free.num_graph_captures == len(decode_keys) + num_mixed
    extra = len(decode_keys) * DECODE_S + num_mixed * MIXED_S
    assert charged.graph_capture_s == pytest.approx(extra)
    assert charged.makespan_s - free.makespan_s == pytest.approx(extra)


def _mixed_captures(shapes: list[BatchShape]) -> int:
    """Prefill and mixed graphs captured: a step's (tokens, sequences) bucket met with a
    block table wider than any captured for that bucket so far (the engine replays a
    wider graph, never a narrower one)."""
    widest: dict[tuple[int, int], int] = {}
    captures = 0
    for shape in shapes:
        if not shape.num_prefill_tokens or not shape.num_graph_rows:
            continue
        bucket = (shape.num_graph_rows, decode_graph_rows(shape.num_requests))
        width = graph_width_tokens(shape.longest_context_tokens)
        if widest.get(bucket, 0) < width:
            widest[bucket] = width
            captures += 1
    return captures


def test_the_roofline_knows_no_graphs_and_reports_no_capture(geometry: ModelGeometry) -> None:
    result, _ = run(geometry, [RequestSpec(0, 0.0, 100, 50)], None)
    assert (result.num_graph_captures, result.graph_capture_s) == (0, 0.0)
    assert "num_graph_captures" not in result.to_dict()


# -- committed calibrations without capture costs give the results of before ----------------


def small_trace() -> list[RequestSpec]:
    rng = np.random.default_rng(7)
    arrivals = np.cumsum(rng.exponential(0.02, 48))
    arrivals -= arrivals[0]
    return [
        RequestSpec(i, float(arrivals[i]), int(rng.integers(64, 6000)), int(rng.integers(8, 200)))
        for i in range(48)
    ]


# Figures of `small_trace` on Granite-4.0-H-Micro's geometry (AVMP, 256 MiB, 64 running,
# 2,048 tokens per step, H200 profile) simulated at 06cb846, before captures were charged:
# makespan, steps, TTFT p99. A change of the scheduler's may move them legitimately.
BEFORE = {
    "calibration_h100_granite-4.0-h-micro.json": (9.97470271456714, 1437, 8.49717219852609),
    "calibration_h200_granite-4.0-h-micro.json.gz": (6.519715939772241, 1437, 5.213670244348766),
}


def simulate_small(calibration: Path, charge_graph_captures: bool = True) -> SimResult:
    geometry = resolve_model("granite-4.0-h-micro")
    config = SimConfig(profile="h200", calibration=str(calibration), max_num_seqs=64,
                       max_num_batched_tokens=2048, allocator_calls_path=None,
                       charge_graph_captures=charge_graph_captures)  # fmt: skip
    allocator = make_allocator("avmp", geometry, MemoryConfig(256 * MIB))
    return simulate(small_trace(), allocator, geometry, config)


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_committed_calibrations_without_capture_costs_give_the_figures_of_before(
    name: str, tmp_path: Path
) -> None:
    """The H100 cells' calibration (no graph fields at all) and the H200 replays' fit
    with its capture costs taken out: the figures of before (the same steps, times to
    rounding), though the run counts its captures; with the costs the same run takes
    longer."""
    path = RESULTS / name
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    costs = data.pop("graph_captures", None)
    stripped = tmp_path / "stripped.json"
    stripped.write_text(json.dumps(data))
    result = simulate_small(stripped)
    makespan, steps, ttft_p99 = BEFORE[name]
    assert result.num_steps == steps
    # To rounding: the last digits move with the numeric libraries' summation order.
    assert (result.makespan_s, result.ttft_p99_s) == pytest.approx((makespan, ttft_p99), rel=1e-12)
    assert result.num_graph_captures > 0 and result.graph_capture_s == 0.0
    if costs is not None:
        charged = simulate_small(path)
        assert charged.graph_capture_s > 0
        assert charged.makespan_s > result.makespan_s


def test_by_default_a_run_is_a_warmed_up_servers(tmp_path: Path) -> None:
    """Without ``charge_graph_captures`` every bucket counts as captured before the run:
    nothing is charged or counted, and the run is the one whose file has no capture
    costs at all (a layout that meets more shapes is not charged for them)."""
    path = RESULTS / "calibration_h200_s11_granite-4.0-h-micro.json.gz"
    data = json.loads(gzip.decompress(path.read_bytes()))
    assert data.pop("graph_captures", None) is not None
    stripped = tmp_path / "stripped.json"
    stripped.write_text(json.dumps(data))
    steady = simulate_small(path, charge_graph_captures=False)
    assert (steady.num_graph_captures, steady.graph_capture_s, steady.captured_steps_s) == (
        0, 0.0, 0.0)  # fmt: skip
    uncharged = simulate_small(stripped)
    assert (steady.makespan_s, steady.num_steps) == (uncharged.makespan_s, uncharged.num_steps)
    assert simulate_small(path).makespan_s > steady.makespan_s
