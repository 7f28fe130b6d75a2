"""Paired comparisons of AVMP with each baseline, and per-allocator aggregates.

Statistic: the **geometric mean of per-pair ratios** AVMP / baseline. A pair is two
cells that differ only in the allocator: same workload, model, budget, GPU profile,
seed and prefix cache, hence the same trace. Per-pair ratios, not a ratio of means,
because cells of one group differ in scale (a 12 GiB budget serves many times more
requests/s than 1 GiB), and a ratio of means would be a ratio of the largest cells; the
geometric mean because ratios multiply (2x and 0.5x average to 1x, not 1.25x).

Confidence interval: `scipy.stats.bootstrap` with ``paired=True`` over the pairs of the
group (each resample draws pairs with replacement), percentile method (robust with few
pairs), 9,999 resamples, a fixed seed, so the same cells give the same interval. A group
with a single pair has no interval (NaN). A pair where either side has zero throughput
(nothing completed) has no finite ratio: it is left out and counted in
``num_excluded``.

Metrics: req/s and output tokens/s as saved; goodput under latency objectives
(`avmp.sim.metrics.goodput`); and req/s over the requests every allocator of the pair's
trace completed (`common_request_throughput`: the intersection of completed ids across
the allocators run on the same workload, model, budget, profile and seed). The last two
are computed from a cell's per-request columns; cells saved before those existed have
none, so their pairs are left out and counted in ``num_unavailable``.

Same work (`same_work_request_throughput`): where the layouts of a pair key completed
different requests, the sweep replays each layout on only the requests every one of them
completed (`avmp.bench.sweep.same_work_tasks`); the metric is that rerun's req/s, and a
cell's own req/s where every layout completed the same requests. Unlike the "requests all
completed" figure, which times those requests inside a run that also served the others,
it compares the same work from the same arrivals. `load_cells` attaches each rerun to the
cell it repeats (``cell["same_work"]``), so every other table sees the grid's cells only.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avmp.sim.metrics import (
    PHASES,
    REQUEST_COLUMNS,
    SloTargets,
    common_request_ids,
    common_throughput,
    goodput,
    same_work_throughputs,
)

AVMP = "avmp"
PAIR_KEYS = ("workload", "model", "budget_bytes", "profile", "seed", "prefix_cache")
PREFIX_OFF = "off"  # the prefix_cache coordinate of a cell without prefix cache
OPTIONAL_COORDINATES = {"prefix_cache": PREFIX_OFF}
"""Coordinates a saved cell may lack, and what they are then: a cell without prefix
cache does not name one (as cells saved before the axis existed)."""
SAVED_METRICS = ("request_throughput", "output_token_throughput")
METRICS = (*SAVED_METRICS, "goodput", "common_request_throughput",
           "same_work_request_throughput")  # fmt: skip
BOOTSTRAP_SEED = 20260522
N_RESAMPLES = 9_999

Cell = dict[str, Any]


def load_cells(directory: str | Path) -> list[Cell]:
    """Every finished cell of a sweep directory (``DIR/cells/*.json``), sorted by id;
    a rerun on like work is not a cell of its own but the ``same_work`` record of the
    cell it repeats.

    Raises:
        FileNotFoundError: no ``DIR/cells`` folder.
        ValueError: no cells, or a file that is not a cell (naming it).
    """
    cells_dir = Path(directory) / "cells"
    if not cells_dir.is_dir():
        raise FileNotFoundError(f"no sweep results in {directory} (missing {cells_dir})")
    records = [read_cell(p) for p in sorted(cells_dir.glob("*.json"))]
    cells = [r for r in records if not r["cell"].get("same_work")]
    if not cells:
        raise ValueError(f"{cells_dir} holds no finished cells")
    reruns = {_rerun_key(r): r for r in records if r["cell"].get("same_work")}
    for cell in cells:
        rerun = reruns.get(_rerun_key(cell))
        if rerun is not None:
            cell["same_work"] = rerun
    return cells


def _rerun_key(cell: Cell) -> tuple[Any, ...]:
    return tuple(coord(cell, k) for k in (*PAIR_KEYS, "allocator"))


def read_cell(path: Path) -> Cell:
    """One saved cell, checked to have every field the report reads.

    Raises:
        ValueError: not UTF-8 JSON, or not shaped like a cell; the message names the file.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a sweep cell (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not a sweep cell (malformed JSON: {error.msg} at line {error.lineno})"
        ) from None
    problem = cell_problem(record)
    if problem is not None:
        raise ValueError(f"{path}: not a sweep cell ({problem})")
    cell: Cell = record
    return cell


_COORDINATE_TYPES: dict[str, type] = {
    "workload": str,
    "model": str,
    "budget_bytes": int,
    "profile": str,
    "seed": int,
    "allocator": str,
    "cell_id": str,
    "prefix_cache": str,
}
_TIMELINE_FIELDS = ("t_s", "kv_used_bytes", "state_used_bytes")


def cell_problem(record: Any) -> str | None:
    """What makes ``record`` unlike a cell that `avmp.bench.sweep.run_cell` writes, in
    a few words; None when nothing does. The report reads exactly these fields, so a
    hand-edited or foreign file is caught here, by name, not deep inside a table."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in ("cell", "settings", "result") if not isinstance(record.get(k), dict)]
    if missing:
        return f"no {missing[0]!r} object"
    for key, kind in _COORDINATE_TYPES.items():
        value = record["cell"].get(key, OPTIONAL_COORDINATES.get(key))
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"cell.{key} is {value!r}, not {'a string' if kind is str else 'an integer'}"
    if not _is_number(record["settings"].get("num_requests")):
        return "settings.num_requests is not a number"
    return _result_problem(record["result"])


def _result_problem(result: dict[str, Any]) -> str | None:
    for key in _MEAN_FIELDS:
        if not _is_number(result.get(key)):
            return f"result.{key} is {result.get(key)!r}, not a number"
    phases = result.get("phase_s")
    if not isinstance(phases, dict) or not all(_is_number(v) for v in phases.values()):
        return "result.phase_s is not an object of seconds"
    timeline = result.get("timeline")
    if not isinstance(timeline, list) or not all(
        isinstance(p, dict) and all(_is_number(p.get(k)) for k in _TIMELINE_FIELDS)
        for p in timeline
    ):
        return "result.timeline is not a list of points"
    if "completed_requests" in result:
        return _columns_problem(result["completed_requests"])
    return None


def _columns_problem(columns: Any) -> str | None:
    """Per-request columns are optional (older cells lack them) but, when present, must
    be lists of numbers of one length."""
    if not isinstance(columns, dict) or not all(
        isinstance(columns.get(k), list) for k in REQUEST_COLUMNS
    ):
        return "result.completed_requests is not an object of per-request lists"
    lengths = {len(columns[k]) for k in REQUEST_COLUMNS}
    if len(lengths) != 1 or not all(_is_number(v) for k in REQUEST_COLUMNS for v in columns[k]):
        return "result.completed_requests has lists of other lengths or non-numbers"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def coord(cell: Cell, key: str) -> Any:
    """A coordinate of a cell (allocator, workload, model, budget_bytes, profile, seed,
    prefix_cache)."""
    coordinates = cell["cell"]
    if key in coordinates:
        return coordinates[key]
    return OPTIONAL_COORDINATES[key]


@dataclass(frozen=True)
class RatioRow:
    """AVMP over one baseline for one group of pairs: geometric-mean ratio and 95% CI."""

    group: dict[str, Any]
    baseline: str
    metric: str
    num_pairs: int
    num_excluded: int
    ratio: float
    ci_low: float
    ci_high: float
    num_unavailable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _geo_mean_ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    ratios: np.ndarray = np.exp(np.mean(np.log(a) - np.log(b), axis=axis))
    return ratios


def bootstrap_ratio(avmp: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """(ratio, ci_low, ci_high) of paired positive values; NaN CI with one pair."""
    from scipy.stats import bootstrap

    a, b = np.asarray(avmp, dtype=float), np.asarray(base, dtype=float)
    ratio = float(_geo_mean_ratio(a, b))
    if len(a) < 2:
        return ratio, math.nan, math.nan
    if np.allclose(np.log(a) - np.log(b), np.log(a[0]) - np.log(b[0]), rtol=0, atol=1e-12):
        return ratio, ratio, ratio  # every pair has the same ratio: nothing to resample
    result = bootstrap(
        (a, b),
        _geo_mean_ratio,
        paired=True,
        vectorized=True,
        n_resamples=N_RESAMPLES,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return ratio, float(result.confidence_interval.low), float(result.confidence_interval.high)


def metric_values(
    cells: Sequence[Cell], metric: str, slo: SloTargets | None = None
) -> list[float | None]:
    """Each cell's value of ``metric`` (one of `METRICS`), None where the cell lacks
    the per-request columns a derived metric needs.

    Raises:
        ValueError: an unknown metric.
    """
    if metric in SAVED_METRICS:
        return [float(c["result"][metric]) for c in cells]
    if metric == "goodput":
        return [goodput(c["result"], slo or SloTargets()) for c in cells]
    if metric == "common_request_throughput":
        return _common_throughputs(cells)
    if metric == "same_work_request_throughput":
        return _same_work_throughputs(cells)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def _common_throughputs(cells: Sequence[Cell]) -> list[float | None]:
    """req/s over the requests every allocator of a cell's pair key completed."""
    by_key: dict[tuple[Any, ...], list[Cell]] = defaultdict(list)
    for cell in cells:
        by_key[tuple(coord(cell, k) for k in PAIR_KEYS)].append(cell)
    common = {key: common_request_ids(c["result"] for c in group) for key, group in by_key.items()}
    values: list[float | None] = []
    for cell in cells:
        ids = common[tuple(coord(cell, k) for k in PAIR_KEYS)]
        values.append(None if ids is None else common_throughput(cell["result"], ids))
    return values


def _same_work_throughputs(cells: Sequence[Cell]) -> list[float | None]:
    """req/s on the requests every allocator of a cell's pair key completed, from the
    same arrivals (`avmp.sim.metrics.same_work_throughputs`): the cell's own where they
    all completed the same requests, its rerun's where not; None where the pair key's
    cells lack per-request columns or some of its reruns."""
    by_key: dict[tuple[Any, ...], list[Cell]] = defaultdict(list)
    for cell in cells:
        by_key[tuple(coord(cell, k) for k in PAIR_KEYS)].append(cell)
    values: dict[int, float | None] = {}
    for group in by_key.values():
        reruns = None
        if all("same_work" in c for c in group):
            reruns = [c["same_work"]["result"] for c in group]
        found = same_work_throughputs([c["result"] for c in group], reruns)
        values.update((id(c), v) for c, v in zip(group, found, strict=True))
    return [values[id(c)] for c in cells]


def _pairs(
    cells: Sequence[Cell],
    baseline: str,
    metric: str,
    group_keys: Sequence[str],
    slo: SloTargets | None,
) -> dict[tuple[Any, ...], list[tuple[float | None, float | None]]]:
    """Group -> [(avmp value, baseline value)], pairs in sorted pair-key order."""
    by_key: dict[tuple[Any, ...], dict[str, float | None]] = defaultdict(dict)
    for cell, value in zip(cells, metric_values(cells, metric, slo), strict=True):
        pair_key = tuple(coord(cell, k) for k in PAIR_KEYS)
        by_key[pair_key][coord(cell, "allocator")] = value
    groups: dict[tuple[Any, ...], list[tuple[float | None, float | None]]] = defaultdict(list)
    for pair_key in sorted(by_key):
        values = by_key[pair_key]
        if AVMP in values and baseline in values:
            named = dict(zip(PAIR_KEYS, pair_key, strict=True))
            groups[tuple(named[k] for k in group_keys)].append((values[AVMP], values[baseline]))
    return groups


def paired_ratios(
    cells: Sequence[Cell],
    group_keys: Sequence[str] = ("workload",),
    metric: str = "request_throughput",
    baselines: Sequence[str] | None = None,
    slo: SloTargets | None = None,
) -> list[RatioRow]:
    """AVMP / baseline for every group and baseline present in ``cells``.

    Args:
        slo: the objectives of ``goodput`` (default: `SloTargets()`).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    found = sorted({coord(c, "allocator") for c in cells} - {AVMP})
    rows = []
    for baseline in baselines or found:
        for group, pairs in sorted(_pairs(cells, baseline, metric, group_keys, slo).items()):
            named = dict(zip(group_keys, group, strict=True))
            rows.append(_ratio_row(named, baseline, metric, pairs))
    return rows


def _ratio_row(
    group: dict[str, Any],
    baseline: str,
    metric: str,
    pairs: list[tuple[float | None, float | None]],
) -> RatioRow:
    known = [(a, b) for a, b in pairs if a is not None and b is not None]
    finite = [(a, b) for a, b in known if a > 0 and b > 0]
    excluded, unavailable = len(known) - len(finite), len(pairs) - len(known)
    if not finite:
        nan = math.nan
        return RatioRow(group, baseline, metric, 0, excluded, nan, nan, nan, unavailable)
    ratio, low, high = bootstrap_ratio([a for a, _ in finite], [b for _, b in finite])
    return RatioRow(group, baseline, metric, len(finite), excluded, ratio, low, high, unavailable)


_MEAN_FIELDS = (
    "request_throughput",
    "output_token_throughput",
    "num_completed",
    "num_rejected",
    "num_preemptions",
    "num_oom_events",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "makespan_s",
)


def aggregate(
    cells: Sequence[Cell],
    group_keys: Sequence[str] = ("workload", "allocator"),
    slo: SloTargets | None = None,
) -> list[dict[str, Any]]:
    """Per group: number of cells, sums of OOM events and preemptions, means of the
    latency percentiles and throughputs (goodput and req/s over the requests every
    allocator completed included: NaN when no cell of the group has them), mean seconds
    per phase, and the mean share of the budget in use over time (`cache_use`)."""
    groups: dict[tuple[Any, ...], list[Cell]] = defaultdict(list)
    derived: dict[str, dict[int, float | None]] = {
        name: {id(c): v for c, v in zip(cells, metric_values(cells, name, slo), strict=True)}
        for name in ("goodput", "common_request_throughput", "same_work_request_throughput")
    }
    for cell in cells:
        groups[tuple(coord(cell, k) for k in group_keys)].append(cell)
    rows = []
    for key in sorted(groups):
        members = [c["result"] for c in groups[key]]
        row: dict[str, Any] = dict(zip(group_keys, key, strict=True))
        row["num_cells"] = len(members)
        row["total_oom_events"] = int(sum(r["num_oom_events"] for r in members))
        row["total_preemptions"] = int(sum(r["num_preemptions"] for r in members))
        for name in _MEAN_FIELDS:
            row[f"mean_{name}"] = _nan_mean([r[name] for r in members])
        for name, values in derived.items():
            row[f"mean_{name}"] = _nan_mean([values[id(c)] for c in groups[key]])
        row["mean_phase_s"] = {
            p: _nan_mean([r["phase_s"].get(p, 0.0) for r in members]) for p in PHASES
        }
        row["mean_cache_use"] = _nan_mean([cache_use(c) for c in groups[key]])
        rows.append(row)
    return rows


def cache_use(cell: Cell) -> float:
    """Mean fraction of the budget held by handed-out units (padding included) over the
    cell's timeline; NaN without a timeline."""
    points = cell["result"]["timeline"]
    if not points:
        return math.nan
    budget = coord(cell, "budget_bytes")
    used = sum(float(p["kv_used_bytes"] + p["state_used_bytes"]) for p in points)
    return used / (len(points) * float(budget))


def oom_change(cells: Sequence[Cell], baseline: str) -> float:
    """Relative change of total OOM events, AVMP vs ``baseline``, over pairs both ran
    (-0.076 reads "7.6% fewer"); NaN when the baseline had none."""
    by_key: dict[tuple[Any, ...], dict[str, int]] = defaultdict(dict)
    for cell in cells:
        by_key[tuple(coord(cell, k) for k in PAIR_KEYS)][coord(cell, "allocator")] = int(
            cell["result"]["num_oom_events"]
        )
    both = [v for v in by_key.values() if AVMP in v and baseline in v]
    base_total = sum(v[baseline] for v in both)
    if base_total == 0:
        return math.nan
    return sum(v[AVMP] for v in both) / base_total - 1.0


def _nan_mean(values: Sequence[float | None]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else math.nan
