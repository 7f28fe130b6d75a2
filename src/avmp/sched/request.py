"""A request as a workload describes it: when it arrives and how long it is."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a trace. Times in seconds from the trace's start.

    Validated on construction, whoever builds it (trace files, workloads, the engine):
    a NaN or infinite arrival would stall a simulated clock, and a bool or fractional
    token count would be read as some other length.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise ValueError(
                    f"request {self.request_id}: {name} must be a whole number, got {value!r}"
                )
            if value < 1:
                raise ValueError(f"request {self.request_id}: {name} must be >= 1")
        arrival = self.arrival_s
        if isinstance(arrival, bool) or not isinstance(arrival, Real):
            raise ValueError(
                f"request {self.request_id}: arrival_s must be a number, got {arrival!r}"
            )
        if not math.isfinite(arrival) or arrival < 0:
            raise ValueError(
                f"request {self.request_id}: arrival_s must be finite and >= 0, got {arrival!r}"
            )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens
