"""The scheduler that both the trace-replay simulator and the engine drive.

It decides, step by step, which requests run and how many tokens each computes, and
it asks a `CacheAllocator` for every page and slot. It never looks at tensors or at the
clock: the simulator feeds it a trace and a time model, the engine feeds it a model.

The policy follows vLLM V1: continuous batching; running requests are served first in
admission order, then waiting requests are admitted first-come first-served while the
token budget and the running-request limit allow; long prompts are prefilled in chunks
under the token budget. When a running request cannot grow, the most recently admitted
running request is preempted by recompute: all its memory is freed and it goes back to
the front of the waiting queue, its computed tokens lost. Every preemption is an OOM
event. A request that could not fit even in an empty memory is rejected with a reason.

Token accounting: a request holds ``prompt + outputs so far`` tokens; ``num_computed``
of them are in the cache. A step computes the tokens not yet computed (a prefill chunk,
or one decode token); when a request has caught up, the step samples its next output
token. The last output token is never fed back, so a request's cache peaks at
``prompt + output - 1`` tokens.

Typical use (the engine does the same, running the model on each plan)::

    scheduler = Scheduler(allocator, SchedulerConfig())
    scheduler.add_request(spec)
    plan = scheduler.schedule()
    outcome = scheduler.finish_step(plan)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from avmp.memory.spec import CacheAllocator, RequestTooLargeError
from avmp.sched.request import RequestSpec


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits.

    Attributes:
        max_num_seqs: running requests at most (a request holds a state slot while running).
        max_num_batched_tokens: tokens computed per step at most, over all requests
            (prefill chunks and decode tokens alike).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


class RequestStatus(StrEnum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"


class SchedRequest:
    """The scheduler's mutable view of one request.

    ``num_tokens`` is the prompt plus the outputs sampled so far and ``num_computed`` the
    tokens in the cache; ``num_computed_peak`` is the most the cache ever held, so tokens
    computed again after a preemption are known to be recompute. Plain attributes, not
    properties: the scheduler reads them for every running request at every step.
    """

    __slots__ = (
        "spec",
        "request_id",
        "prompt_tokens",
        "output_tokens",
        "status",
        "num_tokens",
        "num_output",
        "num_computed",
        "num_computed_peak",
        "num_preemptions",
    )

    def __init__(self, spec: RequestSpec) -> None:
        self.spec = spec
        self.request_id = spec.request_id
        self.prompt_tokens = spec.prompt_tokens
        self.output_tokens = spec.output_tokens
        self.status = RequestStatus.WAITING
        self.num_tokens = spec.prompt_tokens
        self.num_output = 0
        self.num_computed = 0
        self.num_computed_peak = 0
        self.num_preemptions = 0


class ScheduledChunk(NamedTuple):
    """Tokens ``[start, start + num_tokens)`` of one request, computed in this step.

    A named tuple because one is built per running request per step.

    Attributes:
        num_recompute_tokens: how many of them had been computed before a preemption.
        is_decode: a single new token after the request's prompt (not a prefill chunk).
        is_new: the request was admitted in this step (its slot holds no state yet).
    """

    request_id: int
    start: int
    num_tokens: int
    num_recompute_tokens: int
    is_decode: bool
    is_new: bool

    @property
    def context_tokens(self) -> int:
        """Tokens in the cache once this chunk is computed (what attention reads)."""
        return self.start + self.num_tokens


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request that will never run, and why."""

    request_id: int
    reason: str


@dataclass(frozen=True)
class StepPlan:
    """What one step does: the chunks to compute (running requests first, in admission
    order, then newly admitted ones), who was preempted or rejected while planning, and
    how many of the chunks' tokens are recompute after a preemption."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[int, ...]
    rejected: tuple[Rejection, ...]
    num_recompute_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class StepOutcome:
    """What a step produced: requests that sampled a token (in plan order) and those that
    finished."""

    emitted: tuple[int, ...]
    finished: tuple[int, ...]


@dataclass
class _Budget:
    """A plan being built: the tokens left in the step's budget and what was decided."""

    tokens: int
    num_recompute_tokens: int = 0
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


class Scheduler:
    """Continuous batching with chunked prefill, FCFS admission and preemption by
    recompute, over any `CacheAllocator`.

    ``running`` keeps admission order, so its last element is the preemption victim;
    ``waiting`` is FCFS with preempted requests put back at its front.
    """

    def __init__(self, allocator: CacheAllocator, config: SchedulerConfig) -> None:
        self.allocator = allocator
        self.config = config
        self.requests: dict[int, SchedRequest] = {}
        self.waiting: deque[SchedRequest] = deque()
        self.running: list[SchedRequest] = []
        self.rejections: list[Rejection] = []
        self.num_preemptions = 0
        self._pending_rejections: list[Rejection] = []
        self._outstanding: StepPlan | None = None

    # ---- requests in --------------------------------------------------------------------

    def add_request(self, spec: RequestSpec) -> Rejection | None:
        """Queue a request, or reject it at once if it could not fit in an empty memory.

        Returns:
            The rejection (also reported in the next plan), or None if it was queued.
        Raises:
            ValueError: the id was already added.
        """
        if spec.request_id in self.requests:
            raise ValueError(f"request {spec.request_id} was already added")
        request = SchedRequest(spec)
        self.requests[spec.request_id] = request
        if not self.allocator.fits_alone(spec.total_tokens):
            rejection = self._reject(
                request,
                f"{spec.total_tokens} tokens (prompt {spec.prompt_tokens} + output "
                f"{spec.output_tokens}) do not fit even in an empty memory",
            )
            self._pending_rejections.append(rejection)
            return rejection
        self.waiting.append(request)
        return None

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- planning -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan one step: serve running requests, then admit waiting ones.

        As in vLLM V1, no waiting request is admitted in a step that preempted one, so a
        preempted request is not immediately re-admitted into the memory it just lost.
        """
        if self._outstanding is not None:
            raise RuntimeError("schedule() called again before finish_step() of the last plan")
        budget = _Budget(tokens=self.config.max_num_batched_tokens)
        budget.rejected.extend(self._pending_rejections)
        self._pending_rejections.clear()
        self._schedule_running(budget)
        if not budget.preempted:
            self._schedule_waiting(budget)
        plan = StepPlan(
            tuple(budget.chunks),
            tuple(budget.preempted),
            tuple(budget.rejected),
            budget.num_recompute_tokens,
        )
        self._outstanding = plan if plan.chunks else None  # an empty plan needs no finishing
        return plan

    def _schedule_running(self, budget: _Budget) -> None:
        """Give each running request, in admission order, its next tokens under the budget;
        preempt from the back of the running list when memory is short."""
        running = self.running
        index = 0
        while index < len(running) and budget.tokens > 0:
            request = running[index]
            num_new = min(request.num_tokens - request.num_computed, budget.tokens)
            grown = self._try_grow(request, num_new, budget)
            if grown is None:
                continue  # dropped
            if grown or self._grow_or_preempt(request, num_new, budget):
                self._add_chunk(request, num_new, budget, is_new=False)
                index += 1
            # else: `request` itself was preempted or rejected and left `running`

    def _grow_or_preempt(self, request: SchedRequest, num_new: int, budget: _Budget) -> bool:
        """After ``request`` failed to grow by ``num_new`` tokens, preempt the latest
        admitted running request and retry, until it fits. Returns False if ``request``
        itself had to leave."""
        while True:
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                self._drop_running(
                    request, budget, "cannot grow even with no other request running"
                )
                return False
            self._preempt(victim, budget)
            if victim is request:
                return False
            grown = self._try_grow(request, num_new, budget)
            if grown is not False:
                return bool(grown)

    def _try_grow(self, request: SchedRequest, num_new: int, budget: _Budget) -> bool | None:
        """Grow ``request`` by ``num_new`` tokens: True if it grew, False if memory is
        short, None if it can never fit (it was dropped from `running`, with a reason)."""
        try:
            return self.allocator.grow(request.request_id, num_new) is not None
        except RequestTooLargeError as error:
            self._drop_running(request, budget, f"cannot grow: {error}")
            return None

    def _schedule_waiting(self, budget: _Budget) -> None:
        """Admit waiting requests first-come first-served; stop at the first that does
        not fit (FCFS: no request overtakes the head of the queue)."""
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed, budget.tokens)
            admitted = self._admit(request, num_new, budget)
            if admitted is None:
                continue  # rejected and dropped from the queue: try the next one
            if not admitted:
                return
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_chunk(request, num_new, budget, is_new=True)

    def _admit(self, request: SchedRequest, num_new: int, budget: _Budget) -> bool | None:
        """Ask for the request's slot and first chunk's pages.

        Returns:
            True if admitted, False if memory is short now, None if the request was
            rejected: one that does not fit while no other request holds memory never will.
        """
        try:
            blocks = self.allocator.admit(request.request_id, num_new)
        except RequestTooLargeError as error:
            blocks = None
            reason = f"cannot be admitted: {error}"
        else:
            reason = "cannot be admitted even into an empty memory"
        if blocks is not None:
            return True
        if self.running or self.allocator.request_ids:
            return False
        self.waiting.popleft()
        budget.rejected.append(self._reject(request, reason))
        return None

    def _add_chunk(
        self, request: SchedRequest, num_new: int, budget: _Budget, *, is_new: bool
    ) -> None:
        """Put the request's next ``num_new`` tokens into the plan and spend the budget."""
        start = request.num_computed
        budget.tokens -= num_new
        if start >= request.num_computed_peak:  # the common case: nothing to recompute
            is_decode = num_new == 1 and start >= request.prompt_tokens
            budget.chunks.append(
                ScheduledChunk(request.request_id, start, num_new, 0, is_decode, is_new)
            )
            return
        recompute = min(start + num_new, request.num_computed_peak) - start
        budget.num_recompute_tokens += recompute
        budget.chunks.append(
            ScheduledChunk(request.request_id, start, num_new, recompute, False, is_new)
        )

    # ---- preemption and rejection -------------------------------------------------------

    def _preempt(self, victim: SchedRequest, budget: _Budget) -> None:
        """Free all of ``victim``'s memory and put it at the front of the queue."""
        self.running.remove(victim)  # the last element, or close to it
        self.allocator.free(victim.request_id)
        victim.num_computed = 0
        victim.num_preemptions += 1
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        budget.preempted.append(victim.request_id)

    def _drop_running(self, request: SchedRequest, budget: _Budget, reason: str) -> None:
        self.running.remove(request)
        self.allocator.free(request.request_id)
        budget.rejected.append(self._reject(request, reason))

    def _reject(self, request: SchedRequest, reason: str) -> Rejection:
        request.status = RequestStatus.REJECTED
        rejection = Rejection(request.request_id, reason)
        self.rejections.append(rejection)
        return rejection

    # ---- after the step -----------------------------------------------------------------

    def finish_step(self, plan: StepPlan, stopped: Iterable[int] = ()) -> StepOutcome:
        """Record that the plan's chunks were computed.

        Args:
            plan: the plan returned by the last `schedule()`; a plan with chunks is
                finished once, before the next is made (an empty one may be skipped).
            stopped: requests whose token sampled in this step ends them although they
                have output tokens left (the engine's end-of-sequence token); they finish
                like the others. Ids that sampled nothing in this step are ignored.
        Returns:
            The requests that sampled a token, and those that finished (their memory freed).
        """
        if plan is not self._outstanding and plan.chunks:
            raise RuntimeError("finish_step() needs the plan of the last schedule() call")
        self._outstanding = None
        stop = set(stopped)
        emitted: list[int] = []
        finished: list[int] = []
        requests = self.requests
        for chunk in plan.chunks:
            request = requests[chunk.request_id]
            if request.status is not RequestStatus.RUNNING:
                continue
            computed = request.num_computed + chunk.num_tokens
            request.num_computed = computed
            if computed > request.num_computed_peak:
                request.num_computed_peak = computed
            if computed < request.num_tokens:
                continue  # a prefill chunk that did not reach the end: nothing sampled
            request.num_output += 1
            request.num_tokens += 1
            emitted.append(request.request_id)
            if request.num_output >= request.output_tokens or request.request_id in stop:
                finished.append(request.request_id)
        self._release(finished)
        return StepOutcome(tuple(emitted), tuple(finished))

    def stop(self, request_id: int) -> bool:
        """Finish a request now, running or waiting, freeing its memory.

        For a stop learned late: the engine reads step N's tokens while step N+1 runs, so
        an end-of-sequence token sampled at N is seen after N+1 was planned, in which the
        request may have been preempted back to the queue. Call between steps (no plan
        outstanding). Returns whether the request was unfinished.
        """
        if self._outstanding is not None:
            raise RuntimeError("stop() called while a plan is outstanding")
        request = self.requests[request_id]
        if request.status is RequestStatus.RUNNING:
            self._release([request_id])
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
            request.status = RequestStatus.FINISHED
        else:
            return False
        return True

    def _release(self, finished: list[int]) -> None:
        if not finished:
            return
        done = set(finished)
        for request_id in finished:
            self.allocator.free(request_id)
            self.requests[request_id].status = RequestStatus.FINISHED
        self.running = [r for r in self.running if r.request_id not in done]

    # ---- invariants ---------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise AssertionError unless the queues, the statuses and the allocator agree.

        Call between steps (after `finish_step`): then every running request holds exactly
        its computed tokens, and only running requests hold memory.
        """
        running_ids = [r.request_id for r in self.running]
        assert len(self.running) <= self.config.max_num_seqs, "too many running requests"
        assert sorted(running_ids) == sorted(self.allocator.request_ids), (
            f"running {running_ids} vs live in the allocator {self.allocator.request_ids}"
        )
        for request in self.running:
            assert request.status is RequestStatus.RUNNING, f"{request.request_id}: status"
            held = self.allocator.num_tokens(request.request_id)
            assert held == request.num_computed, (
                f"request {request.request_id}: allocator holds {held} tokens, "
                f"computed {request.num_computed}"
            )
            assert 0 < request.num_computed < request.num_tokens
        for request in self.waiting:
            assert request.status is RequestStatus.WAITING, f"{request.request_id}: status"
            assert request.num_computed == 0, f"{request.request_id}: waiting with a cache"
        queued = len(self.running) + len(self.waiting)
        assert len(set(running_ids) | {r.request_id for r in self.waiting}) == queued
        for request in self.requests.values():
            assert request.num_output <= request.output_tokens
            assert request.num_tokens == request.prompt_tokens + request.num_output
