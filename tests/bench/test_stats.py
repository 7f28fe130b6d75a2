from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench_helpers import make_cell

from avmp.bench.stats import (
    aggregate,
    bootstrap_ratio,
    cache_use,
    cell_problem,
    load_cells,
    oom_change,
    paired_ratios,
)
from avmp.sim.metrics import SloTargets


def _cells(ratios: list[float]) -> list[dict]:
    cells = []
    for seed, ratio in enumerate(ratios):
        cells.append(make_cell("avmp", seed=seed, request_throughput=2.0 * ratio))
        cells.append(make_cell("static", seed=seed, request_throughput=2.0))
    return cells


def test_ratio_is_geometric_mean_of_pairs_with_ci_around_it() -> None:
    rows = paired_ratios(_cells([1.5, 2.0, 2.5, 3.0]))
    (row,) = rows
    assert row.baseline == "static" and row.num_pairs == 4
    assert row.ratio == pytest.approx(math.exp(sum(map(math.log, [1.5, 2, 2.5, 3])) / 4))
    assert 1.5 <= row.ci_low < row.ratio < row.ci_high <= 3.0


def test_bootstrap_is_deterministic_and_pairs_matter() -> None:
    a, b = [10.0, 20.0, 30.0, 40.0], [5.0, 10.0, 15.0, 21.0]
    assert bootstrap_ratio(a, b) == bootstrap_ratio(a, b)
    ratio, low, high = bootstrap_ratio(a, b)
    assert high - low < 0.1  # paired: the per-pair ratios barely differ
    assert bootstrap_ratio([3.0], [1.5]) == (2.0, *bootstrap_ratio([3.0], [1.5])[1:])
    assert math.isnan(bootstrap_ratio([3.0], [1.5])[1])
    assert bootstrap_ratio([2.0, 4.0], [1.0, 2.0]) == (2.0, 2.0, 2.0)


def test_zero_throughput_pairs_are_excluded_and_counted() -> None:
    cells = _cells([2.0, 2.0]) + [make_cell("avmp", seed=9, request_throughput=1.0),
                                   make_cell("static", seed=9, request_throughput=0.0)]
    (row,) = paired_ratios(cells)
    assert (row.num_pairs, row.num_excluded, row.ratio) == (2, 1, pytest.approx(2.0))


def test_groups_by_budget() -> None:
    cells = _cells([2.0]) + [make_cell("avmp", budget_bytes=2, request_throughput=3.0),
                             make_cell("static", budget_bytes=2, request_throughput=1.0)]
    rows = paired_ratios(cells, ("workload", "budget_bytes"))
    assert [(r.group["budget_bytes"], r.ratio) for r in rows] == [
        (2, pytest.approx(3.0)), (1 << 30, pytest.approx(2.0))]


def test_aggregate_and_oom_change() -> None:
    cells = [make_cell("avmp", num_oom_events=9, num_preemptions=9),
             make_cell("static", num_oom_events=10, num_preemptions=10),
             make_cell("avmp", seed=1, num_oom_events=0, ttft_p99_s=1.5)]
    rows = {r["allocator"]: r for r in aggregate(cells)}
    assert rows["avmp"]["total_oom_events"] == 9 and rows["avmp"]["num_cells"] == 2
    assert rows["avmp"]["mean_ttft_p99_s"] == pytest.approx(1.0)
    assert rows["static"]["mean_phase_s"]["compute"] == 9.0
    assert oom_change(cells, "static") == pytest.approx(-0.1)
    assert math.isnan(oom_change(cells, "unified"))


def test_cache_use_is_the_mean_share_of_the_budget() -> None:
    points = [{"kv_used_bytes": kv, "state_used_bytes": st} for kv, st in ((2, 2), (4, 0))]
    cell = make_cell("avmp", budget_bytes=8, timeline=points)
    assert cache_use(cell) == pytest.approx(0.5)
    assert math.isnan(cache_use(make_cell("avmp")))
    assert aggregate([cell])[0]["mean_cache_use"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"cell": ', "malformed JSON"),
        ("[]", "not a JSON object"),
        ("{}", "no 'cell' object"),
        ('{"cell": {}, "settings": {}, "result": {}}', "cell.workload is None"),
    ],
)
def test_a_file_that_is_not_a_cell_is_named(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "cells").mkdir()
    good = tmp_path / "cells" / "a.json"
    good.write_text(json.dumps(make_cell("avmp")))
    bad = tmp_path / "cells" / "b.json"
    bad.write_text(text)
    with pytest.raises(ValueError) as info:
        load_cells(tmp_path)
    assert str(info.value).startswith(f"{bad}: not a sweep cell") and problem in str(info.value)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"request_throughput": "fast"}, "result.request_throughput is 'fast'"),
        ({"num_oom_events": True}, "result.num_oom_events is True"),
        ({"phase_s": []}, "result.phase_s"),
        ({"timeline": [{"t_s": 0}]}, "result.timeline"),
    ],
)
def test_cell_problem_names_the_first_wrong_field(change: dict[str, object],
                                                 problem: str) -> None:
    cell = make_cell("avmp")
    assert cell_problem(cell) is None
    cell["result"].update(change)
    assert cell_problem(cell) is not None and problem in str(cell_problem(cell))
    budget = make_cell("avmp")
    budget["cell"]["budget_bytes"] = 1.5
    assert cell_problem(budget) == "cell.budget_bytes is 1.5, not an integer"


def _with_requests(allocator: str, seed: int, finish: dict[int, float],
                   ttft: float = 0.5, tpot: float = 0.02) -> dict:
    """A cell whose completed requests finish at the given times (makespan: the last)."""
    ids = sorted(finish)
    columns = {"request_id": ids, "finish_s": [finish[r] for r in ids],
               "ttft_s": [ttft] * len(ids), "tpot_s": [tpot] * len(ids)}
    makespan = max(finish.values())
    return make_cell(allocator, seed=seed, request_throughput=len(ids) / makespan,
                     makespan_s=makespan, completed_requests=columns)


def test_common_throughput_compares_the_requests_both_completed() -> None:
    # unified rejects request 3, which avmp serves last: on req/s unified looks faster,
    # on the requests both completed avmp is (it finished them sooner)
    cells = []
    for seed in range(2):
        cells.append(_with_requests("avmp", seed, {0: 1.0, 1: 2.0, 2: 3.0, 3: 8.0}))
        cells.append(_with_requests("unified", seed, {0: 1.0, 1: 2.0, 2: 4.0}))
    (by_rate,) = paired_ratios(cells)
    assert by_rate.ratio == pytest.approx((4 / 8) / (3 / 4))
    (common,) = paired_ratios(cells, metric="common_request_throughput")
    assert (common.num_pairs, common.num_unavailable) == (2, 0)
    assert common.ratio == pytest.approx((3 / 3) / (3 / 4))


def test_goodput_ratio_uses_the_objectives_given() -> None:
    cells = [_with_requests("avmp", 0, {0: 1.0, 1: 2.0}, ttft=0.5),
             _with_requests("static", 0, {0: 1.0, 1: 2.0}, ttft=1.5)]
    (strict,) = paired_ratios(cells, metric="goodput", slo=SloTargets(ttft_s=1.0))
    assert (strict.num_pairs, strict.num_excluded) == (0, 1)  # static met none: zero
    (loose,) = paired_ratios(cells, metric="goodput", slo=SloTargets(ttft_s=2.0))
    assert loose.ratio == pytest.approx(1.0)
    assert aggregate(cells, ("allocator",), SloTargets(ttft_s=1.0))[1]["mean_goodput"] == 0.0


def test_cells_saved_before_per_request_data_are_not_available() -> None:
    old = _cells([2.0, 2.0])  # no completed_requests, as saved before they existed
    new = [_with_requests("avmp", 5, {0: 1.0}), _with_requests("static", 5, {0: 2.0})]
    for metric in ("goodput", "common_request_throughput"):
        (only_old,) = paired_ratios(old, metric=metric)
        assert (only_old.num_pairs, only_old.num_unavailable) == (0, 2)
        assert math.isnan(only_old.ratio)
        (mixed,) = paired_ratios(old + new, metric=metric)
        assert (mixed.num_pairs, mixed.num_unavailable) == (1, 2)
    rows = aggregate(old)
    assert math.isnan(rows[0]["mean_goodput"])
    assert math.isnan(rows[0]["mean_common_request_throughput"])
    assert rows[0]["mean_request_throughput"] == pytest.approx(4.0)


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown metric 'latency'"):
        paired_ratios(_cells([1.0]), metric="latency")


@pytest.mark.parametrize(
    "columns",
    [[], {"request_id": [0]}, {"request_id": [0, 1], "finish_s": [1.0], "ttft_s": [0.1],
                                "tpot_s": [0.0]},
     {"request_id": [0], "finish_s": ["1"], "ttft_s": [0.1], "tpot_s": [0.0]}],
)
def test_malformed_per_request_columns_are_named(columns: object) -> None:
    cell = make_cell("avmp", completed_requests=columns)
    assert "result.completed_requests" in str(cell_problem(cell))
