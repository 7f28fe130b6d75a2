"""Workloads with shared content (`PREFIX_PRESETS`): deterministic, their segments add
up, and they share exactly what they say."""

from __future__ import annotations

import pytest

from avmp.bench.workloads import PREFIX_PRESETS, PRESETS, make_prefix_workload, make_workload


@pytest.mark.parametrize("name", list(PREFIX_PRESETS))
def test_prefix_workloads_are_deterministic_and_well_formed(name: str) -> None:
    requests = make_prefix_workload(name, seed=3, num_requests=64)
    assert requests == make_prefix_workload(name, seed=3, num_requests=64)
    assert requests != make_prefix_workload(name, seed=4, num_requests=64)
    assert [r.request_id for r in requests] == list(range(64))
    assert all(sum(n for _, n in r.segments) == r.prompt_tokens for r in requests)
    firsts = [r.segments[0][0] for r in requests]
    assert len(set(firsts)) < len(firsts)  # some requests share their beginning


def test_multi_turn_prefix_keeps_multi_turns_trace_and_names_its_history() -> None:
    plain = make_workload("multi_turn", seed=1, num_requests=200)
    shared = make_prefix_workload("multi_turn_prefix", seed=1, num_requests=200)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in plain] == [
        (r.arrival_s, r.prompt_tokens, r.output_tokens) for r in shared
    ]
    by_output = {r.output_segment: r for r in shared}
    later = [r for r in shared if len(r.segments) > 1]
    assert later
    for request in later:  # the previous turn's prompt, then its output, then a message
        previous = by_output[request.segments[-2][0]]
        assert request.segments[:-2] == previous.segments
        assert request.segments[-2][1] == previous.output_tokens


def test_shared_shift_is_vllm_45238s_shape() -> None:
    requests = make_prefix_workload("shared_shift", seed=0, num_requests=4)
    assert {r.prompt_tokens for r in requests} == {2200}
    assert [r.segments[0] for r in requests[:2]] == [("document", 1500), ("document", 1600)]


def test_the_default_bench_grid_is_unchanged_and_bad_names_are_refused() -> None:
    assert not set(PREFIX_PRESETS) & set(PRESETS)
    with pytest.raises(ValueError, match="unknown prefix workload 'chat'; known: multi_turn"):
        make_prefix_workload("chat", seed=0)
    with pytest.raises(ValueError, match="num_requests must be >= 1"):
        make_prefix_workload("few_shot", seed=0, num_requests=0)
