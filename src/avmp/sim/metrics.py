"""What a simulation reports: `SimResult`, and the small recorders that build it.

Every field of `SimResult.deterministic_dict()` comes from the simulated clock and the
allocator's decisions, so the same inputs give byte-identical dictionaries; only the
``measured_*`` fields depend on the machine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

PHASES = ("compute", "allocation", "migration", "compaction", "recompute")
MEASURED_PREFIX = "measured_"


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
    """One simulation's outcome (the contract between `avmp.sim` and `avmp.bench`)."""

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

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (NaN where a percentile had no values)."""
        return dataclasses.asdict(self)

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
