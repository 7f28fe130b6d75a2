from __future__ import annotations

import numpy as np
import pytest

from avmp.bench.workloads import (
    PRESETS,
    STEP_S,
    ArrivalProcess,
    make_workload,
    parse_arrival,
    with_arrivals,
)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "sharegpt_replay"])
def test_same_seed_same_trace_other_seed_other_trace(name: str) -> None:
    assert make_workload(name, 3) == make_workload(name, 3)
    assert make_workload(name, 3) != make_workload(name, 4)


def test_uniform_short_matches_the_paper() -> None:
    reqs = make_workload("uniform_short", 0)
    assert len(reqs) == 512
    prompts = [r.prompt_tokens for r in reqs]
    outputs = [r.output_tokens for r in reqs]
    assert min(prompts) >= 128 and max(prompts) <= 1024
    assert min(outputs) >= 64 and max(outputs) <= 256
    assert [r.arrival_s for r in reqs[:3]] == pytest.approx([0.0, STEP_S, 2 * STEP_S])


def test_mixed_long_has_about_one_fifth_long_prompts() -> None:
    reqs = make_workload("mixed_long", 1, num_requests=2000)
    long = [r.prompt_tokens for r in reqs if r.prompt_tokens >= 16384]
    short = [r.prompt_tokens for r in reqs if r.prompt_tokens < 16384]
    assert 0.17 < len(long) / len(reqs) < 0.23
    assert max(long) <= 65536 and min(short) >= 512 and max(short) <= 4096
    assert all(128 <= r.output_tokens <= 512 for r in reqs)


def test_agentic_burst_is_clipped_lognormal_with_fast_arrivals() -> None:
    reqs = make_workload("agentic_burst", 2)
    assert len(reqs) == 256
    assert all(64 <= r.prompt_tokens <= 65536 for r in reqs)
    median = np.median([r.prompt_tokens for r in reqs])
    assert 3000 < median < 7000  # exp(8.5) ~ 4915
    gaps = np.diff([r.arrival_s for r in reqs])
    assert abs(gaps.mean() - 0.1 * STEP_S) < 0.03 * STEP_S


def test_shift_changes_mix_mid_trace() -> None:
    reqs = make_workload("shift", 0, num_requests=300)
    thirds = [reqs[:100], reqs[100:200], reqs[200:]]
    assert max(r.prompt_tokens for r in thirds[0]) <= 1024
    assert min(r.prompt_tokens for r in thirds[1]) >= 8192
    assert max(r.prompt_tokens for r in thirds[2]) <= 1024


def test_arrival_processes() -> None:
    rng = np.random.default_rng(0)
    assert ArrivalProcess("burst").times(4, rng).tolist() == [0, 0, 0, 0]
    poisson = ArrivalProcess("poisson", rate=10.0).times(5000, np.random.default_rng(1))
    assert poisson[0] == 0 and np.all(np.diff(poisson) >= 0)
    assert abs(np.diff(poisson).mean() - 0.1) < 0.01
    gamma = ArrivalProcess("gamma", rate=10.0, cv=3.0).times(5000, np.random.default_rng(1))
    gaps = np.diff(gamma)
    assert abs(gaps.mean() - 0.1) < 0.02 and 2.5 < gaps.std() / gaps.mean() < 3.5


def test_parse_arrival_and_errors() -> None:
    assert parse_arrival("poisson:4") == ArrivalProcess("poisson", rate=4.0)
    assert parse_arrival("gamma:4:2") == ArrivalProcess("gamma", rate=4.0, cv=2.0)
    assert parse_arrival("burst").kind == "burst"
    for bad in ("poisson", "gamma:x", "zipf:3", "poisson:-1"):
        with pytest.raises(ValueError):
            parse_arrival(bad)
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope", 0)


def test_with_arrivals_keeps_lengths() -> None:
    reqs = make_workload("uniform_short", 0, num_requests=20)
    burst = with_arrivals(reqs, ArrivalProcess("burst"), seed=0)
    assert [r.prompt_tokens for r in burst] == [r.prompt_tokens for r in reqs]
    assert all(r.arrival_s == 0 for r in burst)


@pytest.mark.parametrize(
    ("text", "message"),
    [("poisson:nan", "arrival rate"), ("poisson:1e-308", "arrival rate"),
     ("gamma:1:inf", "arrival cv"), ("gamma:1:1e200", "arrival cv"), ("gamma:1:0", "arrival cv")],
)
def test_arrival_bounds_keep_every_time_finite(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_arrival(text)
    times = ArrivalProcess("gamma", rate=1e-6, cv=100.0).times(64, np.random.default_rng(0))
    assert np.isfinite(times).all()
