"""`SimConfig.overlap`: each step is planned while the previous one runs, as the engine
does, so a request that arrives (or is released by its parent's end) mid-step waits for
the step after the next; one that finds the engine idle is planned at once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import main
from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.sched.request import RequestSpec
from avmp.sim.simulator import SimConfig, SimResult, simulate
from avmp.sim.timing import BatchShape
from sched_helpers import MIB, tiny_geometry

Steps = list[tuple[BatchShape, float]]


def _run(specs: list[RequestSpec], overlap: bool, steps: Steps | None = None) -> SimResult:
    geometry = tiny_geometry()
    allocator = make_allocator("avmp", geometry, MemoryConfig(64 * MIB))
    config = SimConfig(allocator_calls_path=None, check_integrity=True, overlap=overlap)
    on_step = None if steps is None else lambda shape, s: steps.append((shape, s))
    return simulate(specs, allocator, geometry, config, on_step=on_step)


def _ttft(result: SimResult, request_id: int) -> float:
    columns = result.completed_requests
    return columns["ttft_s"][columns["request_id"].index(request_id)]


def _comparable(result: SimResult) -> dict:
    row = result.to_dict()
    row.pop("measured_allocator_cpu_s")
    return row


def _decode_step_s(steps: Steps) -> float:
    """The time of a step that decodes one request and prefills nothing."""
    decodes = [s for shape, s in steps
               if shape.num_decode_requests == 1 and shape.num_prefill_tokens == 0]  # fmt: skip
    assert decodes
    return min(decodes)


def test_an_arrival_mid_step_waits_one_step_more() -> None:
    steps: Steps = []
    alone = [RequestSpec(0, 0.0, 64, 300)]
    busy = _run(alone, overlap=False, steps=steps)
    decode_s = _decode_step_s(steps)
    arrival_s = busy.makespan_s / 2 + decode_s / 3  # in some step, not at its edge
    specs = [*alone, RequestSpec(1, arrival_s, 64, 8)]
    plain, overlapped = _run(specs, overlap=False), _run(specs, overlap=True)
    waited = _ttft(overlapped, 1) - _ttft(plain, 1)
    # the step planned before it arrived decodes request 0 alone; allocator calls
    # (a few microseconds each) are charged to other steps in the two runs
    assert waited == pytest.approx(decode_s, rel=0.05)
    assert _ttft(plain, 1) < 2 * decode_s + max(s for _, s in steps)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_request_that_finds_the_engine_idle_is_planned_at_once(overlap: bool) -> None:
    specs = [RequestSpec(0, 0.0, 64, 4), RequestSpec(1, 5.0, 64, 4)]  # the first long done
    assert _ttft(_run(specs, overlap), 1) == pytest.approx(_ttft(_run(specs, False), 0))


def test_requests_that_arrive_together_run_the_same() -> None:
    specs = [RequestSpec(i, 0.0, 100 + 37 * i, 20 + 11 * i) for i in range(12)]
    assert _comparable(_run(specs, True)) == _comparable(_run(specs, False))


def _turns(busy: bool) -> list[RequestSpec]:
    """A first turn, its follow-up sent at once (held until the answer ends), and, when
    ``busy``, a long request that keeps the engine stepping past the answer's end."""
    first = RequestSpec(0, 0.0, 400, 40, (("sys", 400),), ("answer", 0))
    history = (("sys", 400), (("answer", 0), 40), (("user", 1), 40))
    specs = [first, RequestSpec(1, 0.0001, 480, 8, history)]
    return [*specs, RequestSpec(2, 0.0, 64, 400)] if busy else specs


def test_a_released_turn_waits_one_step_more_while_others_run() -> None:
    steps: Steps = []
    _run(_turns(busy=True), overlap=False, steps=steps)
    plain, overlapped = _run(_turns(True), False), _run(_turns(True), True)
    assert overlapped.held_arrivals["num_requests"] == plain.held_arrivals["num_requests"] == 1
    waited = _ttft(overlapped, 1) - _ttft(plain, 1)
    assert waited == pytest.approx(_decode_step_s(steps), rel=0.05)


def test_a_released_turn_into_an_idle_engine_waits_no_more() -> None:
    plain, overlapped = _run(_turns(False), False), _run(_turns(False), True)
    assert _ttft(overlapped, 1) == pytest.approx(_ttft(plain, 1))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 0.05), st.integers(1, 600), st.integers(1, 60)),
                min_size=1, max_size=20))  # fmt: skip
def test_every_request_completes_and_none_is_answered_sooner(
    rows: list[tuple[float, int, int]],
) -> None:
    specs = [RequestSpec(i, t, p, o) for i, (t, p, o) in enumerate(rows)]
    plain, overlapped = _run(specs, False), _run(specs, True)
    assert overlapped.num_completed == plain.num_completed == len(specs)
    assert overlapped.num_output_tokens == plain.num_output_tokens
    first = min(spec.arrival_s for spec in specs)
    assert all(_ttft(overlapped, i) > 0 for i in range(len(specs)))
    # a plan sees no request before it arrived
    assert overlapped.makespan_s >= max(spec.arrival_s for spec in specs) - first


def test_replay_takes_overlap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    write_jsonl(make_workload("sharegpt_replay", 0, num_requests=48), trace)
    argv = ["replay", str(trace), "--model", "granite-4.0-h-tiny", "--memory", "4GiB",
            "--allocators", "avmp", "--json"]  # fmt: skip
    rows = []
    for extra in ([], ["--overlap"]):
        assert main([*argv, *extra]) == 0
        rows.append(json.loads(capsys.readouterr().out)[0])
    plain, overlapped = rows
    assert overlapped["num_completed"] == plain["num_completed"] == 48
    assert overlapped["ttft_p50_s"] > plain["ttft_p50_s"]
    for extra, said in (([], False), (["--overlap"], True)):  # the report says which
        assert main([*argv[:-1], "--no-progress", *extra]) == 0
        header = capsys.readouterr().out.splitlines()[0]
        assert ("each planned while the previous one runs" in header) is said


def test_overlap_is_off_by_default() -> None:
    assert not SimConfig().overlap
    assert dataclasses.replace(SimConfig(), overlap=True).overlap


BENCH = ["bench", "--quick", "--models", "granite-4.0-h-tiny", "--budgets", "4GiB", "--seeds",
         "1", "--workers", "1", "--no-progress", "--workloads", "sharegpt_replay"]  # fmt: skip


def test_bench_takes_overlap_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 32)
    ttft = {}
    for name, extra in (("plain", []), ("overlap", ["--overlap"])):
        assert main([*BENCH, "--out", str(tmp_path / name), *extra]) == 0
        capsys.readouterr()
        cells = {p.name: json.loads(p.read_text()) for p in (tmp_path / name / "cells").iterdir()}
        assert all(c["settings"].get("overlap", False) is bool(extra) for c in cells.values())
        (avmp,) = [c for path, c in cells.items() if "__avmp" in path]
        ttft[name] = avmp["result"]["ttft_p50_s"]
    assert ttft["overlap"] > ttft["plain"]
    # the plain directory with --overlap is other settings: refused, not mixed
    assert main([*BENCH, "--out", str(tmp_path / "plain"), "--overlap"]) == 2
    assert "made with other overlap" in capsys.readouterr().err
