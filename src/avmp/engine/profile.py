"""Per-step records of the fast runner, for the benchmarks and the simulator's
calibration: a step's shape (as the simulator's `BatchShape` counts it), when the host
started it, and how long it took. Off in normal runs; `RunnerProfile.start` turns it on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from avmp.engine.runner import SequenceWork


@dataclass
class StepRecord:
    """One profiled step: its shape, when the host started it (``time.perf_counter``)
    and its ``seconds``: on CUDA the device time from reaching the step to its last
    kernel (CUDA events, so profiling adds no sync and steps still overlap), on the CPU
    the runner's wall time. ``graph`` marks a replayed CUDA graph, ``captured`` a step
    that captured one. ``longest_prefill_tokens`` is the most tokens one sequence
    computes in the step's prefill work (0 for a pure decode step): a sequence's chunk
    runs serially, so a prefill step's time follows it (see avmp.sim.calibration).
    ``longest_context_tokens`` is the most context tokens of one sequence once the step
    is done (decode or prefill): decode attention scans one sequence's KV serially, so a
    decode step's time follows it beside the mean context. ``num_padded_tokens`` is the
    rows a padded step ran (a CUDA graph's bucket, padding included; 0: unpadded), so
    the cost of padding shows beside the step's own tokens."""

    num_prefill_tokens: int
    num_decode_requests: int
    num_context_tokens: int
    num_attention_pairs: int
    num_requests: int
    started: float
    seconds: float
    graph: bool
    captured: bool = False
    longest_prefill_tokens: int = 0
    longest_context_tokens: int = 0
    num_padded_tokens: int = 0


@dataclass(frozen=True)
class StepMark:
    """Where a profiled step began: host time, and a device event on CUDA."""

    started: float
    event: Any


@dataclass
class RunnerProfile:
    """Per-step records, kept while ``enabled``. A record's device time is read
    (waiting for its events) when `steps` is asked for. A step that captured a CUDA
    graph (decode, prefill or mixed) is marked ``captured``: its time is one-off."""

    enabled: bool = False
    _steps: list[StepRecord] = field(default_factory=list)
    _events: list[tuple[StepRecord, Any, Any]] = field(default_factory=list)

    def start(self) -> None:
        """Forget earlier records and record from now on."""
        self.enabled, self._steps, self._events = True, [], []

    def begin(self, device: torch.device) -> StepMark:
        """Mark the start of a step."""
        return StepMark(time.perf_counter(), _event(device))

    def end(
        self,
        mark: StepMark,
        work: list[SequenceWork],
        device: torch.device,
        graph: bool,
        captured: bool,
        num_padded_tokens: int = 0,
    ) -> None:
        """Record the step begun at ``mark`` (``work``: its sequences; a padded step's
        rows ``num_padded_tokens``)."""
        end = _event(device)
        seconds = time.perf_counter() - mark.started  # replaced by the events' time on CUDA
        record = step_record(work, mark.started, seconds, graph, captured)
        record.num_padded_tokens = num_padded_tokens
        self._steps.append(record)
        if mark.event is not None and end is not None:
            self._events.append((record, mark.event, end))

    @property
    def steps(self) -> list[StepRecord]:
        for record, begin, end in self._events:
            end.synchronize()
            record.seconds = begin.elapsed_time(end) / 1e3
        self._events = []
        return self._steps


def step_record(
    work: list[SequenceWork], started: float, seconds: float, graph: bool, captured: bool
) -> StepRecord:
    """The shape of a step: prefill tokens, decode requests (one token after cached
    context), context tokens once done, query-key pairs its attention computes, the
    longest prefill work of one sequence and the longest context of one sequence."""
    prefill = decode = context = pairs = longest = longest_context = 0
    for w in work:
        n, start = len(w.token_ids), w.num_context
        if n == 1 and start > 0:
            decode += 1
        else:
            prefill += n
            longest = max(longest, n)
        context += start + n
        longest_context = max(longest_context, start + n)
        pairs += n * start + n * (n + 1) // 2
    return StepRecord(
        prefill, decode, context, pairs, len(work), started, seconds, graph, captured, longest,
        longest_context,
    )  # fmt: skip


def _event(device: torch.device) -> torch.cuda.Event | None:
    """A timing event recorded now on the device's stream (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
