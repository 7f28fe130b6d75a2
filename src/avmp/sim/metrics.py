"""What a simulation reports: `SimResult`, and the small recorders that build it.

Every field of `SimResult.deterministic_dict()` comes from the simulated clock and the
allocator's decisions, so the same inputs give byte-identical dictionaries; only the
``measured_*`` fields depend on the machine.

Besides req/s, three metrics compare layouts on the same work: goodput (requests per
second that met every latency objective, as ``vllm bench serve --goodput`` counts them),
throughput over the requests every layout completed, and throughput on the same work
(where the layouts completed different requests, each is replayed on only the requests
all of them completed: `same_work_ids`, `same_work_throughputs`; ``avmp bench`` and
``avmp replay`` both do). They read a result's per-request columns
(`SimResult.completed_requests`), so they can be computed again from a saved result for
any objectives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PHASES = ("compute", "allocation", "migration", "compaction", "recompute", "swap")
MEASURED_PREFIX = "measured_"
# Columns of `SimResult.completed_requests`, one entry per completed request, by id.
REQUEST_COLUMNS = ("request_id", "finish_s", "ttft_s", "tpot_s")
# Per-request times are saved to 0.1 ms (TPOT, tens of ms, to 1 us): far below any
# objective, and a saved cell grows by about 27 bytes per request.
_TIME_DIGITS = 4
_TPOT_DIGITS = 6
DEFAULT_SLO_TTFT_S = 2.0
DEFAULT_SLO_TPOT_MS = 100.0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class SimResult:
    """One simulation's outcome (the contract between `avmp.sim` and `avmp.bench`).

    ``completed_requests`` holds `REQUEST_COLUMNS` of every completed request, from
    which goodput and throughput over the requests every layout completed are computed.
    ``prefix``: what prefix caching did (`avmp.sim.simulator.prefix_report`), empty
    when it was off. ``held_arrivals``: requests whose prompt holds an earlier request's
    output and that arrived before that output was finished, so were sent at its end
    (``num_requests``, ``total_s`` of delay); empty when none was.
    ``num_graph_captures`` and ``graph_capture_s``: the CUDA graphs the run captured
    mid-run and the seconds the calibration charged for them (as an engine replay reports
    its own; 0 where the time model knows no graphs, the roofline); ``captured_steps_s``:
    the compute seconds of the steps that captured them (an engine replay times such a
    step whole, its capture and its run, and leaves it out of its timed span).
    """

    allocator: str
    num_requests: int
    num_completed: int
    num_rejected: int
    rejections: list[dict[str, Any]]
    makespan_s: float
    request_throughput: float
    output_token_throughput: float
    num_preemptions: int
    num_oom_events: int
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    phase_s: dict[str, float]
    timeline: list[dict[str, Any]]
    allocator_stats: dict[str, Any]
    measured_allocator_cpu_s: float
    num_steps: int = 0
    num_output_tokens: int = 0
    num_recompute_tokens: int = 0
    time_model: str = ""
    completed_requests: dict[str, list[Any]] = field(default_factory=dict)
    num_swapped_out: int = 0
    num_swapped_in: int = 0
    num_swap_bytes: int = 0
    policy: dict[str, Any] = field(default_factory=dict)
    prefix: dict[str, Any] = field(default_factory=dict)
    held_arrivals: dict[str, Any] = field(default_factory=dict)
    num_graph_captures: int = 0
    graph_capture_s: float = 0.0
    captured_steps_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (NaN where a percentile had no values); ``prefix`` only
        when prefix caching was on, ``held_arrivals`` only when a request was held and
        the graph captures only when the run captured one, so that results without them
        read as before."""
        fields = dataclasses.asdict(self)
        for name in ("prefix", "held_arrivals"):
            if not fields[name]:
                del fields[name]
        if not self.num_graph_captures:
            del fields["num_graph_captures"], fields["graph_capture_s"], fields["captured_steps_s"]
        return fields

    def deterministic_dict(self) -> dict[str, Any]:
        """`to_dict()` without the machine-dependent ``measured_*`` fields."""
        return {k: v for k, v in self.to_dict().items() if not k.startswith(MEASURED_PREFIX)}


@dataclass
class RequestClock:
    """Simulated times at which each request arrived, emitted its first and last token."""

    arrival_s: dict[int, float] = field(default_factory=dict)
    first_token_s: dict[int, float] = field(default_factory=dict)
    finish_s: dict[int, float] = field(default_factory=dict)
    num_output: dict[int, int] = field(default_factory=dict)

    def record_emitted(self, request_ids: tuple[int, ...], now_s: float) -> None:
        for request_id in request_ids:
            self.first_token_s.setdefault(request_id, now_s)

    def record_finished(self, request_ids: tuple[int, ...], now_s: float) -> None:
        for request_id in request_ids:
            self.finish_s[request_id] = now_s

    def ttfts(self) -> list[float]:
        return [t - self.arrival_s[r] for r, t in self.first_token_s.items()]

    def tpots(self) -> list[float]:
        """Mean time per output token after the first, for finished requests with more
        than one output token."""
        return [
            (self.finish_s[r] - self.first_token_s[r]) / (self.num_output[r] - 1)
            for r in self.finish_s
            if self.num_output[r] > 1
        ]

    def completed_columns(self) -> dict[str, list[Any]]:
        """`REQUEST_COLUMNS` of the finished requests, by request id: finish time from the
        first arrival (the origin of ``makespan_s``), TTFT, and TPOT (0 for a single
        output token, as vLLM's goodput counts it), rounded (see ``_TIME_DIGITS``)."""
        ids = sorted(self.finish_s)
        origin = min(self.arrival_s.values(), default=0.0)
        return {
            "request_id": ids,
            "finish_s": [_rounded(self.finish_s[r] - origin) for r in ids],
            "ttft_s": [_rounded(self.first_token_s[r] - self.arrival_s[r]) for r in ids],
            "tpot_s": [round(self._tpot(r), _TPOT_DIGITS) for r in ids],
        }

    def _tpot(self, request_id: int) -> float:
        num_output = self.num_output[request_id]
        if num_output <= 1:
            return 0.0
        return (self.finish_s[request_id] - self.first_token_s[request_id]) / (num_output - 1)


def _rounded(seconds: float) -> float:
    return round(seconds, _TIME_DIGITS)


@dataclass(frozen=True)
class SloTargets:
    """Latency objectives a request must all meet to count towards goodput.

    The defaults are interactive-chat objectives: a first token within 2 s, then at
    least 10 tokens/s (100 ms per output token), faster than people read.
    """

    ttft_s: float = DEFAULT_SLO_TTFT_S
    tpot_ms: float = DEFAULT_SLO_TPOT_MS

    def __post_init__(self) -> None:
        for name, value in (("TTFT", self.ttft_s), ("TPOT", self.tpot_ms)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"the {name} objective must be a positive number, got {value}")

    def describe(self) -> str:
        """The objectives in words, for table headers and report conditions."""
        return f"TTFT <= {self.ttft_s:g} s and TPOT <= {self.tpot_ms:g} ms"


def has_request_columns(result: Mapping[str, Any]) -> bool:
    """Whether a result (a `SimResult.to_dict()`) carries per-request columns; results
    saved before they existed do not, and their derived metrics are not available."""
    columns = result.get("completed_requests")
    return isinstance(columns, Mapping) and all(k in columns for k in REQUEST_COLUMNS)


def goodput(result: Mapping[str, Any], slo: SloTargets) -> float | None:
    """Requests per second (over the makespan, like ``request_throughput``) that met
    every objective of ``slo``; None without per-request columns."""
    if not has_request_columns(result):
        return None
    columns = result["completed_requests"]
    tpot_limit_s = slo.tpot_ms * 1e-3
    good = sum(
        1
        for ttft, tpot in zip(columns["ttft_s"], columns["tpot_s"], strict=True)
        if ttft <= slo.ttft_s and tpot <= tpot_limit_s
    )
    makespan = float(result["makespan_s"])
    return good / makespan if makespan > 0 else 0.0


def common_request_ids(results: Iterable[Mapping[str, Any]]) -> set[int] | None:
    """Ids every one of ``results`` (runs of one trace) completed; None when one of them
    has no per-request columns."""
    common: set[int] | None = None
    for result in results:
        if not has_request_columns(result):
            return None
        ids = set(result["completed_requests"]["request_id"])
        common = ids if common is None else common & ids
    return common if common is not None else set()


def common_throughput(result: Mapping[str, Any], common: set[int]) -> float | None:
    """Requests per second over ``common`` only: their number over the time from the
    first arrival until the last of them finished (0 when ``common`` is empty); None
    without per-request columns. The same set of requests in every layout, so the
    ratio compares like with like when layouts reject different requests."""
    if not has_request_columns(result):
        return None
    columns = result["completed_requests"]
    finishes = [
        f for r, f in zip(columns["request_id"], columns["finish_s"], strict=True) if r in common
    ]
    if len(finishes) != len(common):
        raise ValueError("common_throughput: the result did not complete every common request")
    span = max(finishes, default=0.0)
    return len(finishes) / span if span > 0 else 0.0


def same_work_ids(completed: Sequence[Collection[int]]) -> frozenset[int] | None:
    """The requests on which runs of one trace are replayed again to compare the same
    work, given the ids each run completed: those every run completed, where the runs
    completed different requests (one rejected prompts another served). None where
    there are fewer than two runs, all completed the same requests, or none in common."""
    if len(completed) < 2:
        return None
    sets = [frozenset(ids) for ids in completed]
    common = frozenset.intersection(*sets)
    return common if common and any(ids != common for ids in sets) else None


def same_work_throughputs(
    results: Sequence[Mapping[str, Any]], reruns: Sequence[Mapping[str, Any]] | None
) -> list[float | None]:
    """Each run's req/s on the same work: its own where every run of ``results`` (runs
    of one trace) completed the same requests, else its rerun's (``reruns``, in the same
    order: each run replayed on `same_work_ids` from the same arrivals), over the
    requests every rerun completed should they differ again. None for every run where
    reruns are needed and not given, or where per-request columns are missing."""
    runs = results
    if not _same_completed(results) and reruns is not None:
        runs = reruns
    if _same_completed(runs):
        return [float(r["request_throughput"]) for r in runs]
    if runs is results:
        return [None] * len(results)  # unlike work, not rerun
    common = common_request_ids(runs)
    return [None if common is None else common_throughput(r, common) for r in runs]


def _same_completed(results: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every result has per-request ids and all completed the same requests."""
    completed = [_completed(r) for r in results]
    return completed[0] is not None and all(ids == completed[0] for ids in completed)


def _completed(result: Mapping[str, Any]) -> frozenset[int] | None:
    columns = result.get("completed_requests")
    if not isinstance(columns, Mapping) or "request_id" not in columns:
        return None
    return frozenset(columns["request_id"])
