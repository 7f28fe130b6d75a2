"""`simulate()` end to end: clock, metrics, determinism, progress, and the real allocators."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory.spec import MemoryConfig
from avmp.sched.request import RequestSpec
from avmp.sched.timeline import TimelineRecorder
from avmp.sim.metrics import PHASES, percentile
from avmp.sim.simulator import SimConfig, SimResult, simulate
from sched_helpers import MIB, ExactBytesAllocator, make_allocator, req, tiny_geometry

CONFIG = SimConfig(allocator_calls_path=None, check_integrity=True)


def random_trace(
    n: int, seed: int, rate: float = 50.0, max_prompt: int = 2000
) -> list[RequestSpec]:
    rng = random.Random(seed)
    t = 0.0
    specs = []
    for i in range(n):
        t += rng.expovariate(rate)
        specs.append(req(i, rng.randint(1, max_prompt), rng.randint(1, 200), arrival_s=t))
    return specs


def run(specs: list[RequestSpec], budget_mib: int = 16, **config: object) -> SimResult:
    options = {"allocator_calls_path": None, "check_integrity": True, **config}
    return simulate(specs, make_allocator(budget_mib), tiny_geometry(), SimConfig(**options))


def test_simple_trace_completes_and_phases_add_up_to_the_makespan() -> None:
    result = run([req(i, 100 + 50 * i, 20) for i in range(10)])
    assert result.num_completed == 10 and result.num_rejected == 0
    assert result.num_output_tokens == 200
    # all arrive at t=0: no idle time, so the clock is the sum of the phases
    assert sum(result.phase_s.values()) == pytest.approx(result.makespan_s)
    assert set(result.phase_s) == set(PHASES)
    assert result.request_throughput == pytest.approx(10 / result.makespan_s)
    assert result.output_token_throughput == pytest.approx(200 / result.makespan_s)
    assert 0 < result.ttft_p50_s <= result.ttft_p99_s < result.makespan_s
    assert 0 < result.tpot_p50_s <= result.tpot_p99_s
    assert result.allocator == "exact-test" and result.allocator_stats["num_admits"] >= 10
    assert result.phase_s["allocation"] > 0 and result.phase_s["recompute"] == 0


def test_idle_time_jumps_to_the_next_arrival() -> None:
    result = run([req(0, 50, 5, arrival_s=1.0), req(1, 50, 5, arrival_s=101.0)])
    busy = sum(result.phase_s.values())
    assert result.makespan_s == pytest.approx(100.0 + busy / 2, rel=1e-9)
    # the second request found an idle server: same TTFT as the first
    assert result.ttft_p99_s == pytest.approx(result.ttft_p50_s)
    assert result.timeline[0]["t_s"] > 1.0


# vLLM v1's policy: preemption by recompute, greedy admission (provokes preemptions)
RECOMPUTE = {"preemption": "recompute", "admission": "greedy"}


def test_same_inputs_give_byte_identical_results() -> None:
    specs = random_trace(150, seed=3)
    first = json.dumps(run(specs, budget_mib=8, **RECOMPUTE).deterministic_dict(), sort_keys=True)
    second = json.dumps(
        run(list(reversed(specs)), budget_mib=8, **RECOMPUTE).deterministic_dict(), sort_keys=True
    )
    assert first == second
    assert "measured_allocator_cpu_s" not in first
    assert "num_preemptions" in first and json.loads(first)["num_preemptions"] > 0


def test_to_dict_is_json_and_carries_the_measured_time() -> None:
    result = run(random_trace(20, seed=1))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["measured_allocator_cpu_s"] > 0
    assert set(data) - set(result.deterministic_dict()) == {"measured_allocator_cpu_s"}


def test_preemptions_are_oom_events_and_their_recompute_is_charged() -> None:
    result = run(random_trace(150, seed=3), budget_mib=8, **RECOMPUTE)
    assert result.num_preemptions > 0
    # every preemption follows an OOM event; a failed admission is one too
    assert result.num_oom_events >= result.num_preemptions
    assert result.num_recompute_tokens > 0 and result.phase_s["recompute"] > 0
    assert result.num_completed == 150


def test_rejections_are_reported_with_reasons() -> None:
    specs = [req(0, 10, 5), req(1, 100_000, 5), req(2, 10, 5)]
    result = run(specs, budget_mib=4)
    assert result.num_rejected == 1 and result.num_completed == 2
    assert result.rejections[0]["request_id"] == 1
    assert "empty memory" in result.rejections[0]["reason"]


def test_a_rejected_last_arrival_ends_the_run() -> None:
    result = run([req(0, 10, 5), req(1, 100_000, 5, arrival_s=50.0)], budget_mib=4)
    assert (result.num_completed, result.num_rejected) == (1, 1)
    assert result.makespan_s < 1.0  # from the first arrival to the last completion


def test_progress_reaches_the_total_and_never_goes_back() -> None:
    calls: list[tuple[int, int]] = []
    specs = random_trace(40, seed=5) + [req(99, 100_000, 5, arrival_s=0.1)]
    simulate(
        specs,
        make_allocator(8),
        tiny_geometry(),
        CONFIG,
        on_progress=lambda d, t: calls.append((d, t)),
    )
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (41, 41)
    assert all(t == 41 for _, t in calls)


def test_timeline_is_bounded_ordered_and_within_capacity() -> None:
    result = run(random_trace(100, seed=2), timeline_samples=25)
    assert 20 <= len(result.timeline) <= 25
    times = [p["t_s"] for p in result.timeline]
    assert times == sorted(times)
    for point in result.timeline:
        assert point["kv_used_bytes"] <= point["kv_capacity_bytes"]
        assert point["num_running"] <= 256
    assert run(random_trace(10, seed=2), timeline_samples=0).timeline == []


def test_timeline_recorder_keeps_even_spacing() -> None:
    recorder = TimelineRecorder(target=4)
    usage = make_allocator().usage()
    sampled = []
    for step in range(100):
        if recorder.should_sample(step):
            sampled.append(step)
            recorder.add(float(step), usage, 0, 0)
    points = [p["t_s"] for p in recorder.samples()]
    assert len(points) == 4 and points[0] == 0.0
    gaps = {b - a for a, b in zip(points, points[1:], strict=False)}
    assert max(gaps) - min(gaps) <= recorder.stride


def test_max_steps_is_an_error_not_a_silent_stop() -> None:
    with pytest.raises(RuntimeError, match="max_steps=5"):
        run([req(0, 10, 50)], max_steps=5)


def test_used_allocator_and_duplicate_ids_are_refused() -> None:
    allocator = make_allocator()
    allocator.admit(7, 10)
    with pytest.raises(ValueError, match="holds no request"):
        simulate([req(0, 10, 5)], allocator, tiny_geometry(), CONFIG)
    with pytest.raises(ValueError, match="unique"):
        simulate([req(0, 10, 5), req(0, 20, 5)], make_allocator(), tiny_geometry(), CONFIG)


def test_empty_trace_gives_an_empty_result() -> None:
    result = run([])
    assert result.num_requests == 0 and result.makespan_s == 0.0
    assert result.request_throughput == 0.0 and math.isnan(result.ttft_p50_s)


def test_calibrated_time_model_replaces_the_roofline(tmp_path: Path) -> None:
    points = [
        {
            "num_prefill_tokens": p,
            "num_decode_requests": d,
            "num_context_tokens": c,
            "step_s": 0.01 + 1e-6 * p + 1e-4 * d + 1e-9 * c,
        }
        for p in (0, 100, 1000)
        for d in (0, 4, 32)
        for c in (100, 10_000)
    ]
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"gpu": "test", "model": "tiny-hybrid", "points": points}))
    result = run([req(0, 10, 11)], calibration=str(path))
    assert result.time_model == "CalibratedModel"
    # prefill step then 10 decode steps, all about 10 ms
    assert result.phase_s["compute"] == pytest.approx(11 * 0.01, rel=0.02)
    path.write_text(json.dumps({"gpu": "test", "model": "other", "points": points}))
    with pytest.raises(ValueError, match="not 'tiny-hybrid'"):
        run([req(0, 10, 11)], calibration=str(path))


def test_allocation_phase_follows_the_call_cost_file(tmp_path: Path) -> None:
    path = tmp_path / "calls.json"
    figures = {"admit_median_us": 100.0, "grow_median_us": 0.0, "free_median_us": 50.0}
    path.write_text(json.dumps({"allocators": {"exact-test": {"median_of_repeats": figures}}}))
    result = run([req(i, 10, 3) for i in range(4)], allocator_calls_path=str(path))
    # 4 admits and 4 frees; no grow is charged and no allocation failed
    assert result.allocator_stats["num_oom_events"] == 0
    assert result.phase_s["allocation"] == pytest.approx(4 * 150e-6)


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([5.0], 99) == 5.0


def test_a_few_thousand_requests_simulate_quickly() -> None:
    import time

    specs = random_trace(2000, seed=11, rate=20.0, max_prompt=1000)
    start = time.process_time()
    result = simulate(
        specs,
        ExactBytesAllocator(tiny_geometry(), MemoryConfig(256 * MIB)),
        tiny_geometry(),
        SimConfig(allocator_calls_path=None),
    )
    elapsed = time.process_time() - start
    assert result.num_completed == 2000
    assert elapsed < 5.0, f"{elapsed:.2f} s of CPU for 2000 requests"


@pytest.mark.parametrize("name", ["avmp", "unified", "static", "oracle"])
def test_real_allocators_end_to_end(name: str) -> None:
    from avmp.memory.registry import make_allocator as make_real
    from avmp.models.zoo import resolve_model

    geometry = resolve_model("jamba-1.5-mini")
    rng = random.Random(0)
    specs = [
        req(
            i,
            rng.choice([rng.randint(64, 512), rng.randint(4000, 20000)]),
            rng.randint(8, 64),
            arrival_s=i * 0.01,
        )
        for i in range(120)
    ]

    def once() -> SimResult:
        allocator = make_real(name, geometry, MemoryConfig(1 << 30))
        return simulate(
            specs, allocator, geometry, SimConfig(allocator_calls_path=None, check_integrity=True)
        )

    result = once()
    assert result.num_completed + result.num_rejected == 120
    assert result.num_completed > 0
    assert result.allocator_stats["num_frees"] >= result.num_completed
    expected_migration = result.allocator_stats["num_chunks_migrated"] * 68e-6
    assert result.phase_s["migration"] == pytest.approx(expected_migration)
    assert json.dumps(result.deterministic_dict()) == json.dumps(once().deterministic_dict())


_CHILD = """
import json, random, sys
sys.path[:0] = [{tests!r}, {here!r}]
from sched_helpers import make_allocator, tiny_geometry
from test_simulator import random_trace
from avmp.sim.simulator import SimConfig, simulate
result = simulate(random_trace(120, seed=4), make_allocator(8), tiny_geometry(),
                  SimConfig(allocator_calls_path=None))
print(json.dumps(result.deterministic_dict(), sort_keys=True))
"""


def test_results_do_not_depend_on_the_process_or_its_hash_seed() -> None:
    import os
    import subprocess
    import sys

    here = Path(__file__).parent
    code = _CHILD.format(tests=str(here.parent), here=str(here))
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1] and json.loads(outputs[0])["num_completed"] == 120


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 6000), st.integers(1, 40)), min_size=1, max_size=30),
    budget_mib=st.integers(16, 400),
    name=st.sampled_from(["avmp", "unified", "static", "oracle"]),
    max_tokens=st.sampled_from([64, 512, 8192]),
)
def test_random_traces_on_real_allocators_keep_invariants(
    lengths: list[tuple[int, int]], budget_mib: int, name: str, max_tokens: int
) -> None:
    """Small memories force preemptions, migrations and compactions; after every step the
    allocator's and the scheduler's invariants hold, and every request completes or is
    rejected because it could not fit alone."""
    from avmp.memory.registry import make_allocator as make_real
    from avmp.models.zoo import resolve_model

    geometry = resolve_model("jamba-1.5-mini")
    specs = [req(i, p, o, arrival_s=0.001 * i) for i, (p, o) in enumerate(lengths)]
    allocator = make_real(name, geometry, MemoryConfig(budget_mib * MIB))
    config = SimConfig(
        allocator_calls_path=None, check_integrity=True, max_num_batched_tokens=max_tokens
    )
    result = simulate(specs, allocator, geometry, config)
    assert result.num_completed + result.num_rejected == len(specs)
    fits = make_real(name, geometry, MemoryConfig(budget_mib * MIB)).fits_alone
    for rejection in result.rejections:
        spec = specs[rejection["request_id"]]
        assert not fits(spec.total_tokens), rejection
    completed = [
        s for s in specs if s.request_id not in {r["request_id"] for r in result.rejections}
    ]
    assert result.num_output_tokens == sum(s.output_tokens for s in completed)


# ---------------------------------------------------------------- non-finite times


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arrival_s": math.nan}, "arrival_s must be finite"),
        ({"arrival_s": math.inf}, "arrival_s must be finite"),
        ({"arrival_s": -1.0}, "arrival_s must be finite and >= 0"),
        ({"arrival_s": True}, "arrival_s must be a number"),
        ({"prompt_tokens": True}, "prompt_tokens must be a whole number"),
        ({"output_tokens": 2.5}, "output_tokens must be a whole number"),
        ({"prompt_tokens": 0}, "prompt_tokens must be >= 1"),
    ],
)
def test_request_spec_refuses_what_would_stall_or_mislead_the_simulator(
    fields: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {
        "request_id": 7,
        "arrival_s": 0.0,
        "prompt_tokens": 3,
        "output_tokens": 2,
        **fields,
    }
    with pytest.raises(ValueError, match=f"request 7: {message}"):
        RequestSpec(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("arrival", [math.nan, math.inf])
def test_simulator_refuses_a_non_finite_arrival(arrival: float) -> None:
    """Defence in depth: a spec that skipped its own validation (NaN compares false with
    every clock value, so the idle jump never reached it: the loop spun forever)."""
    bad = req(1, 10, 5, arrival_s=1.0)
    object.__setattr__(bad, "arrival_s", arrival)
    with pytest.raises(ValueError, match=r"request 1: arrival_s is (nan|inf)"):
        run([req(0, 10, 5), bad])


@pytest.mark.parametrize("step_s", [math.nan, -1.0, math.inf])
def test_simulator_refuses_a_time_model_step_that_is_not_a_duration(
    step_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("avmp.sim.simulator.RooflineModel.step_seconds", lambda self, s: step_s)
    with pytest.raises(ValueError, match="RooflineModel"):
        run([req(0, 10, 5)])
    with pytest.raises(ValueError, match="RooflineModel"):
        run([req(0, 10, 5)], **RECOMPUTE)


def test_per_request_columns_agree_with_the_summary_metrics() -> None:
    specs = random_trace(40, seed=3) + [req(99, 100_000, 5, arrival_s=0.5)]
    result = run(specs, budget_mib=8)
    columns = result.completed_requests
    assert result.num_rejected == 1 and 99 not in columns["request_id"]
    assert columns["request_id"] == sorted(columns["request_id"])
    assert len(columns["request_id"]) == result.num_completed
    assert max(columns["finish_s"]) == pytest.approx(result.makespan_s, abs=1e-4)
    assert percentile(columns["ttft_s"], 50) == pytest.approx(result.ttft_p50_s, abs=1e-4)
    multi_token = [t for t in columns["tpot_s"] if t > 0]  # one-token requests read 0
    assert percentile(multi_token, 50) == pytest.approx(result.tpot_p50_s, abs=1e-6)
    assert json.loads(json.dumps(result.to_dict()))["completed_requests"] == columns
