"""benchmarks/calibrate.py: engine replays' step rows as calibration points (the time
the simulator's clock must advance by, captures dropped, older rows), the calibration it
writes, the in-sample / held-out agreement table, and its mistakes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from avmp.bench.traces import write_jsonl  # noqa: E402
from avmp.engine.tiny import tiny_model  # noqa: E402
from avmp.models.zoo import zoo_config  # noqa: E402
from avmp.sched.request import RequestSpec  # noqa: E402
from avmp.sim.calibration import (  # noqa: E402
    GRAPH_ROWS_FEATURE,
    PHYSICAL_FEATURES,
    load_calibration,
)
from avmp.sim.timing import decode_graph_rows  # noqa: E402
from benchmarks import calibrate  # noqa: E402
from benchmarks.common import read_result, write_result  # noqa: E402


def row(prefill: int, decode: int, period: float, device: float, **flags: Any) -> list[Any]:
    """An engine replay's step row (the longest context of the newest rows and before)."""
    requests = decode + (prefill > 0)
    per_request = flags.get("context", 500)
    graph = prefill == 0 and not flags.get("eager", False)
    return [prefill, decode, per_request * decode + prefill, requests, period, device, graph,
            flags.get("captured", False), prefill,
            max(prefill, per_request if decode else 0)]  # fmt: skip


def test_a_points_time_is_the_device_time_and_the_wait_after_it() -> None:
    """Host starts at 0, 10, 12, 30 ms: the first step's device time of 4 ms is followed
    by 6 ms of idle device; the second (8 ms) runs past the third's start, so no idle;
    the capture is dropped; the points add up to the timeline."""
    steps = [
        row(0, 8, 0.010, 0.004),
        row(100, 8, 0.002, 0.008),
        row(0, 9, 0.018, 0.020, captured=True),
        row(0, 9, 0.005, 0.003),
    ]
    points = calibrate.run_points(steps)
    assert [p["step_s"] for p in points] == pytest.approx([0.010, 0.008, 0.003])
    assert [p["device_s"] for p in points] == [0.004, 0.008, 0.003]
    assert [p["graph"] for p in points] == [1, 0, 1]
    assert points[1]["longest_prefill_tokens"] == 100
    # the capture: 20 ms from 18 ms (the second step's end) to 38, so 0 idle after it
    assert sum(p["step_s"] for p in points) + 0.020 == pytest.approx(0.041)


def test_rows_of_any_age_give_the_fields_they_record() -> None:
    old = row(0, 8, 0.01, 0.01)[:8]
    new = [*row(0, 8, 0.01, 0.01), 4500, 8]
    older, newer = calibrate.run_points([old, old]), calibrate.run_points([new, new])
    assert "longest_context_tokens" not in older[0] and "num_attention_pairs" not in older[0]
    assert newer[0]["num_attention_pairs"] == 4500 and newer[0]["num_padded_tokens"] == 8


def steps_of(scale: float) -> list[list[Any]]:
    """A run's rows timed by a linear truth (graph steps by their padded rows, eager
    decode rows dearer), the host waiting for each step so that a period is its time."""
    rows = []
    for decode in (1, 3, 8, 20, 33, 60):
        for prefill in (0, 64, 700, 3000):
            graph_rows = decode_graph_rows(decode) if prefill == 0 else 0
            eager = decode if prefill else 0
            step_s = scale * (0.003 + 2e-5 * prefill + 1e-5 * decode + 2e-5 * graph_rows
                              + 1e-4 * eager + 0.01 * (prefill > 0))  # fmt: skip
            rows.append(row(prefill, decode, step_s, step_s, context=200 + 100 * (len(rows) % 5)))
    return rows


def results(model: str, trace: Path, scale: float, engine_rps: float) -> dict[str, Any]:
    """A replay's results as benchmarks/engine_replay.py writes them, for the tiny
    model on the CPU, with made-up engine figures and step rows."""
    engine = {"num_requests": 6, "request_throughput": engine_rps, "num_preemptions": 0,
              "num_steps": 24, "steps": steps_of(scale)}  # fmt: skip
    return {
        "device": "test gpu", "model": model, "trace": str(trace), "arrivals": "trace",
        "memory": "4MiB", "max_num_seqs": 4, "max_batched_tokens": 256, "sim_profile": "h100",
        "slo": {"ttft_s": 2.0, "tpot_ms": 100.0}, "prompt_tokens": 6 * 20, "output_tokens": 6 * 4,
        "runs": [{"allocator": name, "engine": engine, "sim": {}} for name in ("avmp", "static")],
    }  # fmt: skip


def write_replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str) -> list[Path]:
    """Two replays of one trace on the tiny model named ``model``, the second timed
    twice as slow."""
    import benchmarks.engine

    tiny = tiny_model(zoo_config("granite-4.0-h-tiny"), seed=0)
    monkeypatch.setattr(benchmarks.engine, "build_model", lambda config, device: tiny)
    monkeypatch.setattr(benchmarks.engine, "transformers_config", lambda name: None)
    trace = tmp_path / "t.jsonl"
    write_jsonl([RequestSpec(i, 0.01 * i, 20, 4) for i in range(6)], trace)
    paths = []
    for name, scale in (("fast", 1.0), ("slow", 2.0)):
        paths.append(tmp_path / f"{name}.json.gz")
        write_result(paths[-1], results(model, trace, scale, 5.0))
    return paths


@pytest.fixture
def replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    return write_replays(tmp_path, monkeypatch, "tiny")


@pytest.fixture
def zoo_replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The replays under a zoo model's name, whose geometry the physical form prices."""
    return write_replays(tmp_path, monkeypatch, "granite-4.0-h-tiny")


def test_a_calibration_from_replays_loads_and_fits_graph_rows(
    replays: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "cal.json"
    assert calibrate.main([str(replays[0]), "--out", str(out), "--form", "linear"]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and len(data["points"]) == 2 * 24  # two runs
    model = load_calibration(out)
    assert GRAPH_ROWS_FEATURE in model.features
    shape = calibrate.point_shape(data["points"][0])
    assert model.step_seconds(shape) == pytest.approx(data["points"][0]["step_s"], rel=1e-6)


def test_agreement_fits_in_sample_and_held_out(
    replays: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each replay against a fit of its own steps, one of the other's alone and one of
    both: the slow replay's own fit prices its steps exactly, the fast one's at half;
    the simulated figures come from the simulator, the engine's from the results."""
    cal_dir, out = tmp_path / "cals", tmp_path / "agreement.json"
    argv = ["--agreement", *map(str, replays), "--calibration-dir", str(cal_dir)]
    assert calibrate.main([*argv, "--forms", "linear", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = read_result(out)
    assert text == calibrate.markdown(result) + "\n"
    rows = {(r["replay"], r["layout"], r["fit"]): r for r in result["rows"]}
    assert len(rows) == 2 * 2 * 3 and {r["form"] for r in rows.values()} == {"linear"}
    assert rows[("fast", "avmp", "joint")]["fitted_on"] == "fast+slow"
    own = rows[("slow", "avmp", "in-sample")]
    other = rows[("slow", "avmp", "held-out")]
    assert (own["fitted_on"], other["fitted_on"]) == ("slow", "fast")
    assert own["eager_predicted_s"] == pytest.approx(own["eager_s"], rel=1e-6)
    assert other["eager_predicted_s"] == pytest.approx(own["eager_s"] / 2, rel=1e-6)
    assert other["graph_predicted_s"] == pytest.approx(own["graph_s"] / 2, rel=1e-6)
    assert own["engine_request_throughput"] == 5.0
    # one arrival every 10 ms: the fast fit's clock and the engine's rows (whose shapes
    # are made up) part at once; the numbers say so rather than hide it
    assert 0 <= own["num_alike_steps"] < own["num_recorded_steps"] == 24
    assert own["sim_request_throughput"] < other["sim_request_throughput"]  # a slower clock
    sources = json.loads((cal_dir / "calibration_fast.json").read_text())["sources"]
    assert sources == [replays[0].name]  # repo_path of a file outside the repository
    assert "| slow | avmp | held-out (fast) | linear | 5.00 |" in text
    assert sorted(path.name for path in cal_dir.iterdir()) == [
        "calibration_fast+slow.json", "calibration_fast.json", "calibration_slow.json"
    ]  # fmt: skip


def test_a_physical_calibration_records_its_form_and_profile(
    zoo_replays: list[Path], tmp_path: Path
) -> None:
    """``--form physical`` writes the form and the GPU profile (the device's by default,
    h100 for a name that is none of the profiles'; ``--profile`` replaces it), and the
    file loads as that form."""
    out = tmp_path / "cal.json"
    assert calibrate.main([str(zoo_replays[0]), "--out", str(out), "--form", "physical"]) == 0
    data = json.loads(out.read_text())
    assert (data["form"], data["profile"]) == ("physical", "h100")
    model = load_calibration(out)
    assert (model.form, model.profile, model.features) == ("physical", "h100", PHYSICAL_FEATURES)
    assert calibrate.main([str(zoo_replays[0]), "--out", str(out), "--form", "physical",
                           "--profile", "h200"]) == 0  # fmt: skip
    assert load_calibration(out).profile == "h200"
    assert calibrate.main([str(zoo_replays[0]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["form"] == calibrate.DEFAULT_FORM == "physical"
    assert calibrate.main([str(zoo_replays[0]), "--out", str(out), "--form", "linear"]) == 0
    assert "form" not in json.loads(out.read_text())  # as the files from before the forms


def test_agreement_sets_the_forms_side_by_side(
    zoo_replays: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both forms by default, each fitted in-sample, held-out and jointly, in one run:
    the summary table gives a row per replay, fit and form, a column per layout and the
    priced steps; the rows table says the form."""
    cal_dir, out = tmp_path / "cals", tmp_path / "agreement.json"
    argv = ["--agreement", *map(str, zoo_replays), "--calibration-dir", str(cal_dir)]
    assert calibrate.main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = read_result(out)
    assert result["forms"] == ["linear", "physical"]
    keys = {(r["replay"], r["layout"], r["fit"], r["form"]) for r in result["rows"]}
    assert len(keys) == len(result["rows"]) == 2 * 2 * 3 * 2
    assert "| replay | fit | form | avmp | static | steps priced: all / decode / " in text
    cells = [line.split(" | ") for line in text.splitlines() if line.startswith("| slow | ")]
    assert [row[1:3] for row in cells if row[1] in ("in-sample", "held-out", "joint")] == [
        [fit, form] for fit in ("in-sample", "held-out", "joint") for form in ("linear", "physical")
    ]  # the forms side by side
    assert "| slow | avmp | joint (fast+slow) | physical | 5.00 |" in text
    physical = json.loads((cal_dir / "calibration_fast_physical.json").read_text())
    assert (physical["form"], physical["profile"]) == ("physical", "h100")
    slow = [r for r in result["rows"] if (r["replay"], r["fit"]) == ("slow", "in-sample")]
    for row in slow:  # every step is decode or mixed, graph or eager: the sums agree
        assert row["decode_s"] + row["mixed_s"] == pytest.approx(row["graph_s"] + row["eager_s"])


@pytest.mark.parametrize("session", ["s11", "s7", "s6"])
def test_docs_show_the_forms_side_by_side_as_the_committed_results_give(session: str) -> None:
    """docs/BENCHMARKS.md's tables of the two forms are the summaries the committed
    agreements print, and those agreements are of the committed replays."""
    from benchmarks.common import REPO_ROOT, RESULTS_DIR

    result = read_result(RESULTS_DIR / f"calibration_forms_h200_{session}.json.gz")
    assert result["forms"] == ["linear", "physical"]
    assert all((REPO_ROOT / path).is_file() for path in result["replays"])
    docs = (REPO_ROOT / "docs" / "BENCHMARKS.md").read_text()
    missing = [line for line in calibrate._summary(result["rows"]) if line not in docs]
    assert not missing, missing[:3]


def test_an_agreement_from_before_the_forms_prints_as_it_did() -> None:
    """Results without forms (session 6's) keep their table: no form column, no summary."""
    from benchmarks.common import RESULTS_DIR

    result = read_result(RESULTS_DIR / "calibration_agreement_h200_s6.json.gz")
    text = calibrate.markdown(result)
    assert "| form |" not in text and "steps priced: all" not in text
    sharegpt = "engine_replay_sharegpt_h200_s6"
    assert f"| {sharegpt} | avmp | in-sample ({sharegpt}) | 15.94 |" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.json.gz", "--out", "c.json"], "no such results file"),
        (["REPLAY"], "give --out"),
        ([], "give engine_replay results files"),
        (["--agreement", "REPLAY"], "two or more replays"),
        (["REPLAY", "OTHER_MODEL", "--out", "c.json"], "replays of one model"),
        (["REPLAY", "--cells", "missing.json", "--out", "c.json"], "no such calibration"),
        (["NOT_A_REPLAY", "--out", "c.json"], "not an engine_replay results file"),
        (["REPLAY", "--out", "c.json", "--form", "physical"], "unknown model 'tiny'"),
        (["REPLAY", "--out", "c.json", "--form", "physical", "--profile", "x"], "profile 'x'"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    replay, other = tmp_path / "r.json", tmp_path / "o.json"
    write_result(replay, results("tiny", tmp_path / "t.jsonl", 1.0, 5.0))
    write_result(other, results("other", tmp_path / "t.jsonl", 1.0, 5.0))
    not_a_replay = tmp_path / "n.json"
    not_a_replay.write_text("[1, 2]")
    named = {"REPLAY": replay, "OTHER_MODEL": other, "NOT_A_REPLAY": not_a_replay}
    assert calibrate.main([str(named.get(a, a)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_steps_alike_count_from_the_first_until_the_two_part() -> None:
    from avmp.sim.timing import BatchShape

    steps = [row(0, 8, 0.01, 0.01), row(100, 8, 0.01, 0.01), row(0, 9, 0.01, 0.01)]
    same = [BatchShape(r[0], r[1], r[2], 0, r[3]) for r in steps]
    assert calibrate.alike_steps(steps, same) == 3
    assert calibrate.alike_steps(steps, same[:2]) == 2  # the simulator ran fewer
    parted = [same[0], BatchShape(100, 8, steps[1][2], 0, 8), same[2]]  # one request less
    assert calibrate.alike_steps(steps, parted) == 1


def test_replays_without_profiled_steps_are_refused() -> None:
    empty = {"runs": [{"engine": {"steps": []}}], "model": "m"}
    with pytest.raises(ValueError, match="no profiled engine steps"):
        calibrate.replay_points(empty)


def test_docs_show_the_agreement_the_committed_results_give() -> None:
    """docs/BENCHMARKS.md's held-out table is the one the committed agreement prints, and
    that agreement is of the committed replays."""
    from benchmarks.common import REPO_ROOT, RESULTS_DIR

    result = read_result(RESULTS_DIR / "calibration_agreement_h200_s6.json.gz")
    assert all((REPO_ROOT / path).is_file() for path in result["replays"])
    docs = (REPO_ROOT / "docs" / "BENCHMARKS.md").read_text()
    missing = [line for line in calibrate.markdown(result).splitlines() if line not in docs]
    assert not missing, missing[:3]


def test_a_replay_captures_the_warm_ups_mixed_graphs_before_its_run() -> None:
    """The buckets `Engine.warmup` would capture (half of the cap, a step's worth of
    context), captured without its prompts and reported as the simulator's keys."""
    from types import SimpleNamespace

    from avmp.engine.device_batch import StepShape
    from benchmarks.engine_replay import capture_common_mixed

    asked: list[tuple[int, int]] = []
    shapes = [StepShape(t, s, 512, s) for t, s in ((256, 128), (8192, 1), (64, 32), (32, 1))]

    def common(max_num_seqs: int, context: int) -> list[StepShape]:
        asked.append((max_num_seqs, context))
        return shapes

    runner = SimpleNamespace(use_mixed_graphs=True, max_mixed_graphs=6, mixed_graphs={},
                             common_mixed_shapes=common)  # fmt: skip
    runner.capture_mixed = lambda chosen: runner.mixed_graphs.update(dict.fromkeys(chosen))
    config = SimpleNamespace(max_model_len=None, max_num_batched_tokens=8192,
                             max_num_seqs=128, block_size=16)  # fmt: skip
    engine = SimpleNamespace(runner=runner, config=config)
    assert capture_common_mixed(engine) == [[256, 128, 8192], [8192, 1, 8192], [64, 32, 8192]]
    assert asked == [(128, 8192)]
    runner.use_mixed_graphs = False
    assert capture_common_mixed(engine) == []


def test_a_replay_simulates_with_its_devices_calibration_where_there_is_one() -> None:
    from benchmarks.engine_replay import default_calibration

    assert default_calibration("h200", "granite-4.0-h-micro").name == (
        "calibration_h200_granite-4.0-h-micro.json.gz"
    )  # the replays' fit, compressed, before the older engine cells beside it
    assert default_calibration("h200", "nemotron-h-8b").name == (
        "calibration_h100_nemotron-h-8b.json"
    )  # no H200 calibration of it


def test_a_compressed_calibration_is_written_and_read_back(
    replays: list[Path], tmp_path: Path
) -> None:
    """``--out CAL.json.gz`` writes gzip (a replay fit holds ~16k points, ~5 MB of JSON),
    which `load_calibration` reads as it reads plain JSON: same fit."""
    plain, packed = tmp_path / "cal.json", tmp_path / "cal.json.gz"
    for out in (plain, packed):
        assert calibrate.main([str(replays[0]), "--out", str(out), "--form", "linear"]) == 0
    assert packed.read_bytes()[:2] == b"\x1f\x8b"  # gzip's magic number
    assert load_calibration(packed).coefficients == load_calibration(plain).coefficients


def test_a_mixed_graph_row_is_priced_on_its_padded_tokens() -> None:
    """A row of a prefill step that replayed a graph (the newest rows record its padded
    tokens) becomes a graph point, and its shape runs those rows."""
    mixed = [*row(100, 8, 0.01, 0.01), 4000, 128]
    mixed[GRAPH_COLUMN] = True
    (point,) = calibrate.run_points([mixed, row(0, 8, 0.01, 0.01)])[:1]
    assert point["graph"] == 1 and point["num_padded_tokens"] == 128
    assert calibrate.point_shape(point).num_graph_rows == 128
    decode = calibrate.run_points([row(0, 20, 0.01, 0.01), row(0, 8, 0.01, 0.01)])[0]
    assert calibrate.point_shape(decode).num_graph_rows == 32  # an older row: no padding


GRAPH_COLUMN = calibrate.GRAPH


def test_a_calibration_records_what_the_replays_captures_cost(
    replays: list[Path], tmp_path: Path
) -> None:
    """Captured rows are no points: per kind, the median of their time less the fit's
    price of the same step replayed, and how many; a calibration without captured rows
    has no ``graph_captures`` (loads with no capture cost)."""
    results = read_result(replays[0])
    steps = results["runs"][0]["engine"]["steps"]
    # three decode captures and one mixed, the host waiting for each (period = device)
    extra = {(0, 3): 0.05, (0, 20): 0.07, (0, 60): 0.11, (64, 8): 0.2}
    for (prefill, decode), seconds in extra.items():
        twin = next(r for r in steps if (r[0], r[1]) == (prefill, decode))
        captured = list(twin)
        captured[4] = captured[5] = twin[5] + seconds
        captured[calibrate.CAPTURED] = True
        steps.insert(steps.index(twin), captured)
    write_result(replays[0], results)
    out = tmp_path / "cal.json"
    assert calibrate.main([str(replays[0]), "--out", str(out), "--form", "linear"]) == 0
    data = json.loads(out.read_text())
    assert len(data["points"]) == 2 * 24  # the captured rows are not points
    costs = data["graph_captures"]
    assert costs["decode"]["count"] == 3 and costs["mixed"]["count"] == 1
    assert costs["decode"]["median_s"] == pytest.approx(0.07, rel=1e-4)
    assert costs["mixed"]["median_s"] == pytest.approx(0.2, rel=1e-4)
    model = load_calibration(out)
    assert (model.decode_capture_s, model.mixed_capture_s) == (
        costs["decode"]["median_s"], costs["mixed"]["median_s"]
    )  # fmt: skip
    plain = tmp_path / "plain.json"
    assert calibrate.main([str(replays[1]), "--out", str(plain), "--form", "linear"]) == 0
    assert "graph_captures" not in json.loads(plain.read_text())
    assert load_calibration(plain).decode_capture_s == 0.0


def test_a_capture_priced_below_its_replay_costs_nothing() -> None:
    """A captured step timed shorter than the fit's price of the step (timing noise)
    is a capture of 0 s, not a negative one."""
    points = calibrate.run_points([row(0, 8, 0.010, 0.004)] * 4)
    model = SimpleNamespace(step_seconds=lambda shape: 0.02)
    costs = calibrate.capture_costs(points, model)
    assert costs == {"decode": {"median_s": 0.0, "count": 4}}


def test_a_replays_table_sets_the_simulators_captures_beside_the_engines() -> None:
    """Results whose simulated column counted graph captures show both counts and
    seconds; older ones keep the engine's capture seconds alone, as the docs show them."""
    from benchmarks import engine_replay
    from benchmarks.common import RESULTS_DIR

    results = read_result(RESULTS_DIR / "engine_replay_h100.json.gz")
    assert "| graph capture s |" in engine_replay.markdown(results)
    for index, run in enumerate(results["runs"]):
        run["engine"] |= {"num_graph_captures": 11, "graph_capture_s": 1.04}
        run["sim"] |= {"num_graph_captures": 16 + index, "graph_capture_s": 1.94}
    text = engine_replay.markdown(results)
    assert "| graph captures engine / sim (s) |" in text
    assert "| 11 / 16 (1.0 / 1.9) |" in text and "| 11 / 17 (1.0 / 1.9) |" in text


def test_simulated_rates_leave_out_the_captures_as_the_engines_do() -> None:
    """The engine's req/s is over its wall time less its graph captures: the simulated
    one over its makespan less the captures it charged (unchanged where it charged none)."""
    from benchmarks.engine_replay import _less_captures, _rates_less_captures

    result = {"makespan_s": 10.0, "num_completed": 30, "num_output_tokens": 900,
              "request_throughput": 3.0, "output_token_throughput": 90.0,
              "graph_capture_s": 2.0}  # fmt: skip
    assert _rates_less_captures(result) == {
        "timed_s": 8.0, "request_throughput": 30 / 8.0, "output_token_throughput": 900 / 8.0
    }  # fmt: skip
    assert _less_captures(result)["makespan_s"] == 8.0
    free = result | {"graph_capture_s": 0.0}
    assert _rates_less_captures(free) == {"timed_s": 10.0}
    assert _less_captures(free) is free
    # the steps that captured leave the span too, whole (the engine times them so)
    whole = result | {"captured_steps_s": 1.5}
    assert _rates_less_captures(whole)["timed_s"] == 6.5
    assert _less_captures(whole)["makespan_s"] == 6.5
