"""A turn whose prompt holds an earlier turn's output joins no earlier than that output
ends (a client sends the next turn once it has the answer), with or without a cache."""

from __future__ import annotations

import pytest

from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.sched.request import RequestSpec
from avmp.sim.simulator import SimConfig, SimResult, simulate
from sched_helpers import MIB, tiny_geometry


def _run(specs: list[RequestSpec], prefix_cache: str = "off", budget_mib: int = 64
         ) -> SimResult:  # fmt: skip
    geometry = tiny_geometry()
    allocator = make_allocator("avmp", geometry, MemoryConfig(budget_mib * MIB))
    config = SimConfig(allocator_calls_path=None, check_integrity=True, prefix_cache=prefix_cache)
    return simulate(specs, allocator, geometry, config)


def _two_turns(second_arrival_s: float) -> list[RequestSpec]:
    first = RequestSpec(0, 0.0, 400, 200, (("sys", 400),), ("answer", 0))
    history = (("sys", 400), (("answer", 0), 200), (("user", 1), 40))
    return [first, RequestSpec(1, second_arrival_s, 640, 8, history)]


def _times(result: SimResult) -> tuple[float, float, float]:
    """The first turn's end, the second's first token (from its end and its 7 gaps
    between tokens) and its TTFT, in seconds from the first arrival."""
    columns = result.completed_requests
    row = {rid: i for i, rid in enumerate(columns["request_id"])}
    first_token = columns["finish_s"][row[1]] - 7 * columns["tpot_s"][row[1]]
    return columns["finish_s"][row[0]], first_token, columns["ttft_s"][row[1]]


@pytest.mark.parametrize("prefix_cache", ["off", "avmp"])
def test_an_early_next_turn_waits_for_the_answer_it_holds(prefix_cache: str) -> None:
    early = _run(_two_turns(0.001), prefix_cache)
    finish, first_token, ttft = _times(early)
    assert first_token > finish
    assert ttft == pytest.approx(first_token - finish, abs=1e-3)  # from when it was sent
    assert early.held_arrivals["num_requests"] == 1
    assert early.held_arrivals["total_s"] == pytest.approx(finish - 0.001, abs=1e-3)
    assert "held_arrivals" in early.to_dict()
    late = _run(_two_turns(1000.0), prefix_cache)  # after the answer: nothing held
    assert late.held_arrivals == {} and "held_arrivals" not in late.to_dict()
    if prefix_cache == "avmp":  # the held turn finds the whole answer in the cache
        assert early.prefix["num_hit_tokens"] == early.prefix["num_ideal_tokens"] > 400


def test_a_prompt_without_named_output_is_never_held() -> None:
    specs = [RequestSpec(0, 0.0, 400, 200, (("sys", 400),), ("answer", 0)),
             RequestSpec(1, 0.001, 440, 8, (("sys", 400), (("user", 1), 40)))]  # fmt: skip
    assert _run(specs).held_arrivals == {}


def test_a_rejected_parent_releases_what_it_held() -> None:
    """A parent too large for memory is rejected; its next turn still runs."""
    big = RequestSpec(0, 0.0, 40_000, 8, (("doc", 40_000),), ("answer", 0))
    child = RequestSpec(1, 0.001, 40_048, 8, (("doc", 40_000), (("answer", 0), 8),
                                             (("user", 1), 40)))  # fmt: skip
    small = RequestSpec(2, 0.002, 64, 8)
    result = _run([big, child, small], budget_mib=8)
    assert result.num_rejected == 2 and result.num_completed == 1
