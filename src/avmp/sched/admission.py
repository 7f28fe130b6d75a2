"""Admission that anticipates growth: before a waiting request starts, check that the
memory it and the running requests will need as they decode still fits, so that a
request admitted now is not preempted a few steps later (thrash: the more capacity a
layout has, the more long prompts it admits, and the more they preempt each other).

``reserve`` (ours). Each request ``i`` holds ``c_i`` tokens once its prompt and the
outputs so far are in the cache, and will grow by ``g_i`` more (its remaining outputs
times a learned ratio, minus the last token, which is never fed back). Decode adds one
token per request per step and a request frees everything when it finishes, so ``t``
steps from now the cache holds ``sum over {i: g_i >= t} of (c_i + t)`` tokens. That is
largest just before a request finishes, at some ``t = g_k``: with the requests sorted by
``g`` (largest first), the peak is ``max_k S_k + k * g_k`` (``S_k`` the sum of the first
``k`` requests' ``c``), held by ``k`` requests, each wasting under one KV unit to
rounding. The candidate is admitted when every such point fits (`could_hold`). Summing
every request's own peak instead would reserve memory that requests finishing early
give back, and admit less than fits.

The learned ratio is the share of their output limit that recently finished requests
produced (1 until one finishes; below 1 only when requests stop early at an
end-of-sequence token), so a simulator whose requests run to their limit reserves
exactly what they will use.

``sglang`` (SGLang as it ships): reserve ``ratio x`` every running request's remaining
output; the ratio starts at 0.7, decays linearly to 0.098 over 600 steps without a
retraction, and after one is reset to ``(decoded + 20 x running) / output limits``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from avmp.memory.spec import CacheAllocator
from avmp.sched.swap import (
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO,
    NEW_TOKEN_RATIO_DECAY_STEPS,
    RETRACT_DECODE_STEPS,
    Admission,
)

if TYPE_CHECKING:
    from avmp.sched.scheduler import SchedRequest

RATIO_WINDOW = 256  # finished requests the learned ratio looks back over


class GrowthEstimate:
    """The admission rule's state: the new-token ratio, and the check itself."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.ratio = INIT_NEW_TOKEN_RATIO if admission is Admission.SGLANG else 1.0
        self._finished: deque[tuple[int, int]] = deque(maxlen=RATIO_WINDOW)
        self._produced = 0
        self._limits = 0

    # ---- learning the ratio ------------------------------------------------------------

    def observe_finish(self, num_output: int, output_limit: int) -> None:
        """A request finished after ``num_output`` of its ``output_limit`` tokens."""
        if self.admission is not Admission.RESERVE:
            return
        if len(self._finished) == self._finished.maxlen:
            old_output, old_limit = self._finished[0]
            self._produced -= old_output
            self._limits -= old_limit
        self._finished.append((num_output, output_limit))
        self._produced += num_output
        self._limits += output_limit
        self.ratio = self._produced / self._limits if self._limits else 1.0

    def after_step(self, preempted: bool, running: Sequence[SchedRequest]) -> None:
        """SGLang's schedule: decay after a step without preemption, reset after one."""
        if self.admission is not Admission.SGLANG:
            return
        if not preempted:
            decay = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / NEW_TOKEN_RATIO_DECAY_STEPS
            self.ratio = max(MIN_NEW_TOKEN_RATIO, self.ratio - decay)
            return
        limits = sum(r.output_tokens for r in running)
        if limits:
            decoded = sum(r.num_output for r in running)
            self.ratio = min(1.0, (decoded + RETRACT_DECODE_STEPS * len(running)) / limits)

    # ---- the check ----------------------------------------------------------------------

    def admits(
        self,
        allocator: CacheAllocator,
        running: Sequence[SchedRequest],
        candidate: SchedRequest,
    ) -> bool:
        """Whether ``candidate`` may start beside ``running`` (always when none runs)."""
        if self.admission is Admission.GREEDY or not running:
            return True
        unit = allocator.kv_unit_tokens
        ratio = self.ratio
        now: list[int] = []
        growth: list[int] = []
        for request in (*running, candidate):
            remaining = request.output_tokens - request.num_output
            now.append(request.num_tokens)
            growth.append(max(0, math.ceil(ratio * remaining) - 1))
        num = len(now)
        total = sum(now) + sum(growth)
        if allocator.could_hold(num, _kv_units(total, num, unit)):
            return True  # even every request at its own peak at once fits
        if self.admission is Admission.SGLANG:
            return False
        return _staggered_peak_fits(allocator, now, growth, unit)


def _kv_units(num_tokens: int, num_requests: int, unit: int) -> int:
    """KV units that ``num_requests`` requests holding ``num_tokens`` tokens between them
    take at most: whole units, each request wasting under one to rounding."""
    return -(-num_tokens // unit) + num_requests if unit else 0


def _staggered_peak_fits(
    allocator: CacheAllocator, now: list[int], growth: list[int], unit: int
) -> bool:
    """Whether the cache fits at every point where it peaks (see the module doc).

    A peak held by more requests in more KV units than another covers it (`could_hold`
    is monotone in both), so only the peaks that no later one covers are asked about.
    """
    order = sorted(range(len(now)), key=growth.__getitem__, reverse=True)
    peaks = []
    held = 0
    for k, index in enumerate(order, start=1):
        held += now[index]
        peaks.append(_kv_units(held + k * growth[index], k, unit))
    most = -1
    for k in range(len(peaks), 0, -1):
        units = peaks[k - 1]
        if units > most:
            if not allocator.could_hold(k, units):
                return False
            most = units
    return True
