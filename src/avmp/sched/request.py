"""A request as a workload describes it: when it arrives, how long it is, and (for
prefix caching) what content its prompt and output share with other requests."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from numbers import Integral, Real

Segment = tuple[Hashable, int]  # (content id, tokens): the same id means the same tokens


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a trace. Times in seconds from the trace's start.

    Validated on construction, whoever builds it (trace files, workloads, the engine):
    a NaN or infinite arrival would stall a simulated clock, and a bool or fractional
    token count would be read as some other length.

    ``segments`` says what the prompt is made of without token ids: ``(content id,
    tokens)`` pieces in order, summing to ``prompt_tokens``; two requests whose pieces
    agree share those tokens (a system prompt, a conversation's history). Empty: the
    prompt shares nothing. ``output_segment``: the content id of the output, so that a
    later prompt can name it (a conversation's next turn); None: unique to this request.
    ``reads_prefix_cache``: False for a request that must compute its whole prompt (the
    engine's prompt log-probabilities): it takes no hit from a prefix cache, as vLLM v1
    skips the cache for such requests, though what it computes may be cached for others.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    segments: tuple[Segment, ...] = ()
    output_segment: Hashable | None = None
    reads_prefix_cache: bool = True

    def __post_init__(self) -> None:
        # the exact types first: the ABC checks are slow, and a trace builds a million specs
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if type(value) is not int and (
                isinstance(value, bool) or not isinstance(value, Integral)
            ):
                raise ValueError(
                    f"request {self.request_id}: {name} must be a whole number, got {value!r}"
                )
            if value < 1:
                raise ValueError(f"request {self.request_id}: {name} must be >= 1")
        arrival = self.arrival_s
        if type(arrival) is not float and (
            isinstance(arrival, bool) or not isinstance(arrival, Real)
        ):
            raise ValueError(
                f"request {self.request_id}: arrival_s must be a number, got {arrival!r}"
            )
        if not math.isfinite(arrival) or arrival < 0:
            raise ValueError(
                f"request {self.request_id}: arrival_s must be finite and >= 0, got {arrival!r}"
            )
        if self.segments:
            lengths = [length for _, length in self.segments]
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
                raise ValueError(f"request {self.request_id}: segment lengths must be >= 1")
            if sum(lengths) != self.prompt_tokens:
                raise ValueError(
                    f"request {self.request_id}: segments hold {sum(lengths)} tokens, "
                    f"the prompt {self.prompt_tokens}"
                )

    def content(self) -> list[Segment]:
        """The request's whole token stream as segments: its prompt's, then its output."""
        prompt = list(self.segments) or [(("prompt", self.request_id), self.prompt_tokens)]
        output = self.output_segment
        if output is None:
            output = ("output", self.request_id)
        return [*prompt, (output, self.output_tokens)]

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens
