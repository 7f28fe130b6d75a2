from __future__ import annotations

import numpy as np
import pytest

from avmp.bench.workloads import (
    LONGDOC_BURST_SIZE,
    PRESETS,
    STEP_S,
    ArrivalProcess,
    conversation_prompts,
    make_workload,
    multi_turn_turns,
    parse_arrival,
    service_estimate_s,
    with_arrivals,
)
from avmp.sched.request import RequestSpec


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


OURS = ("longdoc_mix", "longdoc_burst", "multi_turn")


@pytest.mark.parametrize("name", OURS)
def test_our_presets_ids_follow_arrivals_and_override_keeps_lengths(name: str) -> None:
    reqs = make_workload(name, 5)
    assert len(reqs) == PRESETS[name].num_requests
    assert [r.request_id for r in reqs] == list(range(len(reqs)))
    assert np.all(np.diff([r.arrival_s for r in reqs]) >= 0) and reqs[0].arrival_s == 0
    # --arrival: same lengths, the override's times, and the same trace twice.
    burst = make_workload(name, 5, arrival=ArrivalProcess("burst"))
    assert [(r.prompt_tokens, r.output_tokens) for r in burst] == [
        (r.prompt_tokens, r.output_tokens) for r in reqs
    ]
    assert all(r.arrival_s == 0 for r in burst)
    poisson = ArrivalProcess("poisson", rate=3.0)
    assert make_workload(name, 5, 40, poisson) == make_workload(name, 5, 40, poisson)


def test_longdoc_mix_is_thirty_percent_log_uniform_documents() -> None:
    reqs = make_workload("longdoc_mix", 1, num_requests=4000)
    docs = [r for r in reqs if r.prompt_tokens > 1024]
    chat = [r for r in reqs if r.prompt_tokens <= 1024]
    assert 0.27 < len(docs) / len(reqs) < 0.33
    doc_prompts = np.array([r.prompt_tokens for r in docs])
    assert doc_prompts.min() >= 2048 and doc_prompts.max() <= 32768
    # Log-uniform: the median is the geometric mean of the ends (8192), and each
    # doubling of length (2k-4k, ..., 16k-32k) holds a quarter of the documents.
    assert 7000 < np.median(doc_prompts) < 9500
    per_octave = np.histogram(doc_prompts, bins=[2048, 4096, 8192, 16384, 32769])[0]
    assert np.all(np.abs(per_octave / len(docs) - 0.25) < 0.04)
    assert all(128 <= r.output_tokens <= 512 for r in docs)
    assert all(r.prompt_tokens >= 128 and 64 <= r.output_tokens <= 256 for r in chat)
    gaps = np.diff([r.arrival_s for r in reqs])
    assert abs(gaps.mean() * PRESETS["longdoc_mix"].arrival.rate - 1) < 0.05


def _bursts(reqs: list[RequestSpec], silence_s: float) -> list[list[RequestSpec]]:
    """Split a trace where two arrivals are more than ``silence_s`` apart."""
    groups: list[list[RequestSpec]] = [[reqs[0]]]
    for before, after in zip(reqs, reqs[1:], strict=False):
        if after.arrival_s - before.arrival_s > silence_s:
            groups.append([])
        groups[-1].append(after)
    return groups


def test_longdoc_burst_alternates_chat_and_long_bursts() -> None:
    spec = PRESETS["longdoc_burst"]
    reqs = make_workload("longdoc_burst", 2)
    groups = _bursts(reqs, silence_s=spec.arrival.gap_s / 2)
    assert len(groups) == spec.num_requests // LONGDOC_BURST_SIZE
    for index, group in enumerate(groups):
        assert len(group) == LONGDOC_BURST_SIZE
        # Each burst lands within a short window, well under the silence after it.
        assert group[-1].arrival_s - group[0].arrival_s < spec.arrival.gap_s / 2
        if index % 2 == 0:
            assert all(128 <= r.prompt_tokens <= 1024 for r in group)
            assert all(64 <= r.output_tokens <= 256 for r in group)
        else:
            assert all(12288 <= r.prompt_tokens <= 24576 for r in group)
            assert all(128 <= r.output_tokens <= 512 for r in group)


def test_bursts_arrival_process_and_its_cli_form() -> None:
    process = parse_arrival("bursts:100:4:2.5")
    assert process == ArrivalProcess("bursts", rate=100.0, burst_size=4, gap_s=2.5)
    times = process.times(12, np.random.default_rng(0))
    gaps = np.diff(times)
    assert times[0] == 0 and np.all(gaps >= 0)
    # Gaps 3 and 7 open a new group of four: the silence plus one exponential gap.
    assert np.all(gaps[[3, 7]] >= 2.5)
    assert np.all(np.delete(gaps, [3, 7]) < 2.5)
    for bad in ("bursts:100:4", "bursts:100:2.5:1", "bursts:100:0:1", "bursts:100:4:-1",
                "bursts:100:4:nan", "bursts:0:4:1"):
        with pytest.raises(ValueError):
            parse_arrival(bad)


def test_multi_turn_histories_grow_within_each_conversation() -> None:
    rate = PRESETS["multi_turn"].arrival.rate
    turns = multi_turn_turns(np.random.default_rng(7), 600, ArrivalProcess("poisson", rate=rate))
    prompts, outputs, times = turns.prompts, turns.outputs, turns.arrival_s
    reqs = make_workload("multi_turn", 7, num_requests=600)
    assert [r.prompt_tokens for r in reqs] == prompts.tolist()
    assert [r.arrival_s for r in reqs] == times.tolist()
    assert np.all((outputs >= 32) & (outputs <= 1024)) and prompts.max() <= 32768
    for session in np.unique(turns.session):
        kept = np.flatnonzero(turns.session == session)
        assert turns.turn[kept].tolist() == list(range(len(kept)))  # a prefix, in order
        assert len(kept) <= 8 and 32 <= prompts[kept[0]] <= 512  # a message alone
        for before, after in zip(kept, kept[1:], strict=False):
            # The history (previous prompt and output) plus a new message of 32-512.
            message = prompts[after] - prompts[before] - outputs[before]
            assert 32 <= message <= 512
            # Not before the previous turn could have been served.
            waited = times[after] - times[before]
            assert waited >= service_estimate_s(prompts[before], outputs[before])
    assert np.mean(turns.turn > 0) > 0.6


@pytest.mark.parametrize("n", [1, 2, 17])
def test_multi_turn_cut_keeps_prefixes_and_the_earliest_turns(n: int) -> None:
    turns = multi_turn_turns(np.random.default_rng(3), n, ArrivalProcess("burst"))
    # All conversations start at t = 0: the first n turns are n first turns.
    assert turns.session.tolist() == list(range(n)) and not turns.turn.any()
    turns = multi_turn_turns(np.random.default_rng(3), n, ArrivalProcess("poisson", rate=1e-4))
    if n > 1:  # conversations hours apart: the first one's turns all come first
        assert turns.session[:2].tolist() == [0, 0]
    for session in np.unique(turns.session):
        assert turns.turn[turns.session == session].tolist() == list(
            range(np.sum(turns.session == session))
        )


def test_conversation_prompts_cap_the_history() -> None:
    messages = np.array([[100, 200, 300]])
    outputs = np.array([[50, 60, 70]])
    assert conversation_prompts(messages, outputs).tolist() == [[100, 350, 710]]
    capped = conversation_prompts(messages, outputs, max_prompt_tokens=400)
    assert capped.tolist() == [[100, 350, 400]]
