"""The engine benchmarks' CPU side: the replay of benchmarks/engine_replay.py runs every
layout on a tiny model (all at t = 0, and at a trace's arrival times), its trace sources,
options and report, and the docs tables of all three GPU benchmarks are rebuilt from
the committed results (what docs/BENCHMARKS.md shows)."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from avmp.engine.tiny import tiny_model  # noqa: E402
from avmp.models.geometry import ConvColumns  # noqa: E402
from avmp.models.zoo import zoo_config  # noqa: E402
from avmp.sched.request import RequestSpec  # noqa: E402
from avmp.sim.metrics import SloTargets, goodput  # noqa: E402
from benchmarks.common import REPO_ROOT, RESULTS_DIR, read_result  # noqa: E402


def load(name: str) -> ModuleType:
    """The benchmark script ``benchmarks/<name>.py``."""
    return importlib.import_module(f"benchmarks.{name}")


def calibration(path: Path) -> Path:
    """A step-time calibration without a model name (any geometry may load it)."""
    points = [
        {"num_prefill_tokens": p, "num_decode_requests": d, "num_context_tokens": c,
         "num_requests": r, "step_s": 0.004 + 2e-5 * p + 3e-5 * d + 1e-8 * c}
        for p, d, c, r in ((512, 0, 512, 1), (0, 8, 4000, 8), (0, 32, 9000, 32),
                           (100, 4, 3000, 5), (2048, 0, 2048, 2), (0, 1, 700, 1))
    ]  # fmt: skip
    path.write_text(json.dumps({"gpu": "test", "points": points}))
    return path


def test_replay_runs_every_layout_and_the_simulator_agrees_on_decisions(tmp_path: Path) -> None:
    replay = load("engine_replay")
    model = tiny_model(zoo_config("granite-4.0-h-tiny"), seed=0)
    trace = [RequestSpec(i, 0.0, 5 + 7 * i, 3 + i % 4) for i in range(8)]
    argv = ["--device", "cpu", "--memory", "4MiB", "--max-num-seqs", "4"]
    args = replay.parse_args([*argv, "--calibration", str(calibration(tmp_path / "c.json"))])
    geometry = model.geometry(next(model.parameters()).dtype, None, ConvColumns.VLLM)
    geometry = dataclasses.replace(geometry, name="tiny")
    for allocator in ("avmp", "static", "unified", "unified-shipped"):
        engine = replay.replay(args, model, allocator, trace)
        sim = replay.simulate(args, geometry, allocator, trace)
        assert engine["num_completed"] == len(trace) == sim["num_completed"]
        assert engine["num_steps"] == sim["num_steps"]  # one scheduler, one allocator
        assert engine["num_preemptions"] == sim["num_preemptions"]
        assert engine["timeline"] and sim["timeline"]


def test_replay_honours_arrivals_on_both_sides(tmp_path: Path) -> None:
    """Requests 40 ms apart: on every layout the engine and the simulator complete them
    all, none before its arrival, and report latency percentiles and goodput (objectives
    every request meets here, however slow the machine: goodput is then req/s)."""
    replay = load("engine_replay")
    model = tiny_model(zoo_config("granite-4.0-h-tiny"), seed=0)
    trace = [RequestSpec(i, 0.04 * i, 5 + 7 * i, 3 + i % 4) for i in range(8)]
    argv = ["--device", "cpu", "--memory", "4MiB", "--max-num-seqs", "4", "--slo-ttft-s", "1e3"]
    argv += ["--slo-tpot-ms", "1e6"]
    args = replay.parse_args([*argv, "--calibration", str(calibration(tmp_path / "c.json"))])
    geometry = model.geometry(next(model.parameters()).dtype, None, ConvColumns.VLLM)
    for allocator in ("avmp", "static", "unified", "unified-shipped"):
        engine = replay.replay(args, model, allocator, trace)
        sim = replay.simulate(args, geometry, allocator, trace)
        for side in (engine, sim):
            columns = side["completed_requests"]
            assert columns["request_id"] == list(range(len(trace)))
            assert all(ttft >= 0 for ttft in columns["ttft_s"])
            finishes = columns["finish_s"]
            assert all(f >= r.arrival_s for f, r in zip(finishes, trace, strict=True))
            assert 0 <= side["ttft_p50_s"] <= side["ttft_p99_s"]
            assert side["goodput"] == pytest.approx(side["request_throughput"])
            assert goodput(side | {"makespan_s": 1.0}, SloTargets(1e3, 1e-6)) == 0.0
        assert engine["wall_s"] >= trace[-1].arrival_s  # the engine waited for the last one


def write_trace(path: Path, arrivals: list[float]) -> Path:
    from avmp.bench.traces import write_jsonl

    write_jsonl([RequestSpec(i, t, 4 + 5 * i, 2 + i % 3) for i, t in enumerate(arrivals)], path)
    return path


def test_trace_sources_and_arrival_modes(tmp_path: Path) -> None:
    from avmp.bench.workloads import make_workload

    replay = load("engine_replay")
    path = write_trace(tmp_path / "t.jsonl", [1.5, 1.75, 2.0])
    online = replay.load_trace(replay.parse_args(["--trace", str(path)]))
    assert [r.arrival_s for r in online] == [0.0, 0.25, 0.5]  # the first at t = 0
    offline = replay.load_trace(replay.parse_args(["--trace", str(path), "--arrivals", "zero"]))
    assert [r.arrival_s for r in offline] == [0.0] * 3
    assert [r.prompt_tokens for r in offline] == [r.prompt_tokens for r in online]
    args = replay.parse_args(["--workload", "shift", "--num-requests", "9", "--seed", "3"])
    assert replay.load_trace(args) == make_workload("shift", 3, 9)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give one trace source"),
        (["--trace", "t.jsonl", "--workload", "shift"], "give one trace source"),
        (["--workload", "nope"], "unknown workload 'nope'"),
        (["--trace", "missing.jsonl"], "no such trace file"),
        (["--workload", "shift", "--slo-ttft-s", "0"], "TTFT objective must be a positive"),
    ],
)
def test_replay_mistakes_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load("engine_replay").main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_replay_main_on_the_cpu_reports_latency_goodput_and_the_unbounded_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CPU smoke path end to end: a trace with arrivals, every layout, the unbounded
    reference, saved and drawn as the docs table."""
    import benchmarks.engine

    replay = load("engine_replay")
    tiny = tiny_model(zoo_config("granite-4.0-h-tiny"), seed=0)
    monkeypatch.setattr(benchmarks.engine, "build_model", lambda config, device: tiny)
    monkeypatch.setattr(benchmarks.engine, "transformers_config", lambda name: None)
    trace = write_trace(tmp_path / "t.jsonl", [0.02 * i for i in range(6)])
    out = tmp_path / "r.json.gz"
    argv = [
        "--device", "cpu", "--trace", str(trace), "--memory", "4MiB", "--max-num-seqs", "4",
        "--max-batched-tokens", "256", "--rounds", "1", "--unbounded", "--out", str(out),
        "--calibration", str(calibration(tmp_path / "c.json")), "--slo-ttft-s", "1000",
        "--slo-tpot-ms", "100000",  # met however slow this machine is
    ]  # fmt: skip
    assert replay.main(argv) == 0
    results = read_result(out)
    assert results["arrivals"] == "trace" and results["arrival_span_s"] == pytest.approx(0.1)
    unbounded = results["unbounded"]
    assert unbounded["engine"]["num_preemptions"] == 0 == unbounded["sim"]["num_preemptions"]
    assert unbounded["memory_bytes"] % (2 << 20) == 0
    text = capsys.readouterr().out
    assert text.endswith(replay.markdown(results) + "\n")
    assert "arriving at the trace's times over 0.1 s" in text
    assert "TTFT <= 1000 s and TPOT <= 100000 ms" in text
    runs = {run["allocator"]: run for run in results["runs"]}
    for name, run in runs.items():
        lost = 1 - run["engine"]["request_throughput"] / unbounded["engine"]["request_throughput"]
        assert f"| {name} | " in text and f"| {lost:.1%} / " in text
    good = runs["avmp"]["engine"]["goodput"] / runs["static"]["engine"]["goodput"]
    assert "- AVMP / static: " in text and f"goodput {good:.2f}x measured" in text
    assert "| unbounded (avmp) |" in text
    runs["static"]["engine"]["goodput"] = 0.0  # no request met the objectives
    assert "goodput n/a (zero goodput) measured" in replay.markdown(results)


def test_replay_report_states_the_ratios_of_its_results(tmp_path: Path) -> None:
    replay = load("engine_replay")
    results = read_result(RESULTS_DIR / "engine_replay_h100.json.gz")
    text = replay.markdown(results)
    runs = {run["allocator"]: run for run in results["runs"]}
    measured = (
        runs["avmp"]["engine"]["request_throughput"]
        / runs["static"]["engine"]["request_throughput"]
    )
    assert f"AVMP / static: {measured:.2f}x measured" in text
    assert all(f"| {name} |" in text for name in runs)
    replay.plot(results, tmp_path / "split.png")
    assert (tmp_path / "split.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("script", "results"),
    [
        ("engine", "engine_h100.json.gz"),
        ("step_profile", "step_profile_h100.json.gz"),
        ("engine_replay", "engine_replay_h100.json.gz"),
    ],
)
def test_docs_show_the_tables_the_committed_results_give(script: str, results: str) -> None:
    """Every line a GPU benchmark prints for its committed results is in the docs."""
    text = load(script).markdown(read_result(RESULTS_DIR / results))
    docs = (REPO_ROOT / "docs" / "BENCHMARKS.md").read_text()
    missing = [line for line in text.splitlines() if line.strip() and line not in docs]
    assert not missing, missing[:3]


def test_resimulate_reruns_the_simulated_column_of_a_cpu_smoke_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A results file of the CPU smoke path, resimulated: with the run's calibration the
    simulated columns come back as they were (the trace, limits, geometry and profile are
    rebuilt exactly); with a calibration 4x slower every simulated run takes longer while
    the engine's figures stay; the tables say which calibration the sim used."""
    import benchmarks.engine

    replay = load("engine_replay")
    tiny = tiny_model(zoo_config("granite-4.0-h-tiny"), seed=0)
    monkeypatch.setattr(benchmarks.engine, "build_model", lambda config, device: tiny)
    monkeypatch.setattr(benchmarks.engine, "transformers_config", lambda name: None)
    trace = write_trace(tmp_path / "t.jsonl", [0.02 * i for i in range(6)])
    run_cal = calibration(tmp_path / "c.json")
    out = tmp_path / "r.json.gz"
    argv = [
        "--device", "cpu", "--trace", str(trace), "--memory", "4MiB", "--max-num-seqs", "4",
        "--max-batched-tokens", "256", "--rounds", "1", "--unbounded", "--out", str(out),
        "--calibration", str(run_cal), "--allocators", "avmp", "static",
    ]  # fmt: skip
    assert replay.main(argv) == 0
    results = read_result(out)
    assert results["num_requests"] == 6 and results["sim_profile"] == "h100"
    again = replay.resimulate(results, run_cal, trace)
    for old, new in zip([*results["runs"], results["unbounded"]],
                        [*again["runs"], again["unbounded"]], strict=True):  # fmt: skip
        assert new == old
    slow = tmp_path / "slow.json"
    points = json.loads(run_cal.read_text())["points"]
    slow.write_text(json.dumps({"gpu": "test", "points": [
        p | {"step_s": 4 * p["step_s"]} for p in points]}))  # fmt: skip
    capsys.readouterr()
    new_out = tmp_path / "resimulated.json.gz"
    argv = ["--markdown", str(out), "--resimulate", str(slow), "--trace", str(trace)]
    assert replay.main([*argv, "--out", str(new_out)]) == 0
    text = capsys.readouterr().out
    resimulated = read_result(new_out)
    assert text == replay.markdown(resimulated) + "\n"
    assert f"with the calibration `{slow.name}`" in text and f"used `{run_cal.name}`" in text
    for old, new in zip([*results["runs"], results["unbounded"]],
                        [*resimulated["runs"], resimulated["unbounded"]], strict=True):  # fmt: skip
        assert new["engine"] == old["engine"]
        assert new["sim"]["makespan_s"] > old["sim"]["makespan_s"]
    assert "Simulated columns rerun" not in replay.markdown(results)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no such trace file"),  # the smoke trace was recorded by its name alone
        (["--trace", "OTHER"], "is not the run's"),
        (["--trace", "TRACE", "--resimulate", "missing.json"], "no such calibration file"),
    ],
)
def test_resimulate_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    replay = load("engine_replay")
    trace = write_trace(tmp_path / "t.jsonl", [0.0, 0.1])
    other = write_trace(tmp_path / "other.jsonl", [0.0, 0.1, 0.2])
    results = {
        "device": "cpu", "model": "tiny", "trace": "t.jsonl", "arrivals": "trace",
        "memory": "4MiB", "max_num_seqs": 4, "max_batched_tokens": 256,
        "slo": {"ttft_s": 2.0, "tpot_ms": 100.0}, "prompt_tokens": 4 + 9, "output_tokens": 5,
        "runs": [{"allocator": "avmp", "engine": {"num_requests": 2}}],
    }  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    cal = str(calibration(tmp_path / "c.json"))
    named = {"TRACE": str(trace), "OTHER": str(other)}
    argv = ["--markdown", str(path), "--resimulate", cal, *(named.get(a, a) for a in extra)]
    assert replay.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_resimulate_needs_a_results_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert load("engine_replay").main(["--resimulate", "c.json", "--out", "x.json"]) == 2
    assert "--resimulate needs the results file" in capsys.readouterr().err


def test_resimulation_rebuilds_a_workload_trace_from_its_record() -> None:
    from avmp.bench.workloads import make_workload

    replay = load("engine_replay")
    results = {
        "model": "m", "workload": "shift", "seed": 3, "arrivals": "trace", "memory": "1GiB",
        "max_num_seqs": 8, "max_batched_tokens": 512, "slo": {"ttft_s": 2.0, "tpot_ms": 50.0},
        "runs": [{"engine": {"num_requests": 9}}],  # an older file: no num_requests beside it
    }  # fmt: skip
    args = replay.resimulation_args(results, Path("cal.json"), None)
    expected = make_workload("shift", 3, 9)
    first = expected[0].arrival_s
    assert replay.load_trace(args) == [
        dataclasses.replace(r, arrival_s=r.arrival_s - first) for r in expected
    ]
    assert (args.memory, args.max_num_seqs, args.max_batched_tokens) == ("1GiB", 8, 512)
    assert (args.slo_ttft_s, args.slo_tpot_ms, args.device) == (2.0, 50.0, "cpu")
    del results["arrivals"]  # older results replayed every request at t = 0
    assert all(r.arrival_s == 0 for r in replay.load_trace(replay.resimulation_args(
        results, Path("cal.json"), None)))  # fmt: skip


def test_a_shipped_layout_runs_its_projects_policy() -> None:
    replay = load("engine_replay")
    assert replay.layout_policy("avmp") == ("avmp", {})
    allocator, policy = replay.layout_policy("unified-shipped")
    assert allocator == "unified"
    assert policy == {"preemption": "recompute", "admission": "greedy", "host_tier_bytes": 0}
