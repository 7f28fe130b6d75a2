"""Per-request columns, goodput and throughput over the requests every layout completed."""

from __future__ import annotations

import math
from typing import Any

import pytest

from avmp.sim.metrics import (
    RequestClock,
    SloTargets,
    common_request_ids,
    common_throughput,
    goodput,
    has_request_columns,
)


def _result(ids: list[int], finish: list[float], ttft: list[float], tpot: list[float],
            makespan_s: float | None = None) -> dict[str, Any]:
    columns = {"request_id": ids, "finish_s": finish, "ttft_s": ttft, "tpot_s": tpot}
    return {"makespan_s": max(finish, default=0.0) if makespan_s is None else makespan_s,
            "completed_requests": columns}


def test_clock_columns_are_by_id_from_the_first_arrival_with_one_token_tpot_zero() -> None:
    clock = RequestClock()
    clock.arrival_s.update({7: 10.0, 3: 10.5, 5: 11.0})
    clock.num_output.update({7: 5, 3: 1, 5: 2})
    clock.record_emitted((7, 3), 11.0)
    clock.record_emitted((7, 3), 12.0)  # a later token does not move the first one
    clock.record_finished((3,), 11.0)
    clock.record_finished((7,), 14.0)  # 5 does not finish: not a column entry
    columns = clock.completed_columns()
    assert columns == {"request_id": [3, 7], "finish_s": [1.0, 4.0], "ttft_s": [0.5, 1.0],
                       "tpot_s": [0.0, 0.75]}


def test_clock_columns_are_rounded_to_keep_cells_small() -> None:
    clock = RequestClock()
    clock.arrival_s[0], clock.num_output[0] = 0.0, 4
    clock.record_emitted((0,), 0.123456789)
    clock.record_finished((0,), 1.0)
    columns = clock.completed_columns()
    assert columns["ttft_s"] == [0.1235] and columns["finish_s"] == [1.0]
    assert columns["tpot_s"] == [0.292181]


def test_goodput_counts_requests_meeting_every_objective_inclusive() -> None:
    result = _result([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0],
                     ttft=[2.0, 2.5, 0.1, 0.1], tpot=[0.1, 0.01, 0.1001, 0.0])
    # 0 meets both at the limit, 1 misses TTFT, 2 misses TPOT, 3 (one token) meets both
    assert goodput(result, SloTargets(ttft_s=2.0, tpot_ms=100.0)) == pytest.approx(2 / 4.0)
    assert goodput(result, SloTargets(ttft_s=3.0, tpot_ms=200.0)) == pytest.approx(4 / 4.0)
    assert goodput(result, SloTargets(ttft_s=0.05, tpot_ms=200.0)) == 0.0
    assert goodput(_result([], [], [], [], makespan_s=0.0), SloTargets()) == 0.0


def test_results_without_columns_have_no_derived_metrics() -> None:
    old = {"makespan_s": 4.0, "request_throughput": 1.0}
    new = _result([0], [1.0], [0.1], [0.01])
    assert not has_request_columns(old) and has_request_columns(new)
    assert goodput(old, SloTargets()) is None
    assert common_request_ids([new, old]) is None
    assert common_throughput(old, {0}) is None


def test_common_throughput_divides_the_shared_requests_by_when_the_last_finished() -> None:
    # a completes 0..3, b completes 0, 1, 3 (2 rejected): the same work is {0, 1, 3}
    a = _result([0, 1, 2, 3], [1.0, 2.0, 8.0, 5.0], [0.1] * 4, [0.01] * 4)
    b = _result([0, 1, 3], [1.0, 2.0, 6.0], [0.1] * 3, [0.01] * 3)
    common = common_request_ids([a, b])
    assert common == {0, 1, 3}
    assert common_throughput(a, common) == pytest.approx(3 / 5.0)  # its req/s was 4 / 8
    assert common_throughput(b, common) == pytest.approx(3 / 6.0)
    assert common_throughput(a, set()) == 0.0
    with pytest.raises(ValueError, match="common request"):
        common_throughput(b, {2})


@pytest.mark.parametrize("ttft_s, tpot_ms", [(0.0, 100.0), (-1.0, 100.0), (2.0, math.nan),
                                             (2.0, math.inf), (2.0, 0.0)])
def test_objectives_must_be_positive_numbers(ttft_s: float, tpot_ms: float) -> None:
    with pytest.raises(ValueError, match="objective must be a positive number"):
        SloTargets(ttft_s=ttft_s, tpot_ms=tpot_ms)


def test_default_objectives_are_stated() -> None:
    assert SloTargets().describe() == "TTFT <= 2 s and TPOT <= 100 ms"
