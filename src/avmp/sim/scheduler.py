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

from avmp.memory.spec import CacheAllocator, RequestTooLargeError
from avmp.sim.request import RequestSpec


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


@dataclass(slots=True)
class SchedRequest:
    """The scheduler's mutable view of one request.

    ``num_computed`` counts tokens in the cache; ``num_computed_peak`` is the most it ever
    held, so that tokens computed again after a preemption are known to be recompute.
    """

    spec: RequestSpec
    status: RequestStatus = RequestStatus.WAITING
    num_output: int = 0
    num_computed: int = 0
    num_computed_peak: int = 0
    num_preemptions: int = 0

    @property
    def request_id(self) -> int:
        return self.spec.request_id

    @property
    def num_tokens(self) -> int:
        """Prompt plus the output tokens sampled so far."""
        return self.spec.prompt_tokens + self.num_output

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Tokens ``[start, start + num_tokens)`` of one request, computed in this step.

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
    order, then newly admitted ones), and who was preempted or rejected while planning."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[int, ...]
    rejected: tuple[Rejection, ...]

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_recompute_tokens(self) -> int:
        return sum(c.num_recompute_tokens for c in self.chunks)


@dataclass(frozen=True)
class StepOutcome:
    """What a step produced: requests that sampled a token (in plan order) and those that
    finished."""

    emitted: tuple[int, ...]
    finished: tuple[int, ...]


@dataclass
class _Budget:
    """Tokens and running slots left while one plan is built."""

    tokens: int
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
        budget = _Budget(tokens=self.config.max_num_batched_tokens)
        budget.rejected.extend(self._pending_rejections)
        self._pending_rejections.clear()
        self._schedule_running(budget)
        if not budget.preempted:
            self._schedule_waiting(budget)
        return StepPlan(tuple(budget.chunks), tuple(budget.preempted), tuple(budget.rejected))

    def _schedule_running(self, budget: _Budget) -> None:
        """Give each running request, in admission order, its next tokens under the budget;
        preempt from the back of the running list when memory is short."""
        index = 0
        while index < len(self.running) and budget.tokens > 0:
            request = self.running[index]
            num_new = min(request.num_uncomputed, budget.tokens)
            if self._grow_or_preempt(request, num_new, budget):
                budget.chunks.append(self._chunk(request, num_new, is_new=False))
                budget.tokens -= num_new
                index += 1
            # else: `request` itself was preempted or rejected and left `running`

    def _grow_or_preempt(self, request: SchedRequest, num_new: int, budget: _Budget) -> bool:
        """Grow ``request`` by ``num_new`` tokens, preempting the latest admitted running
        request until it fits. Returns False if ``request`` itself had to leave."""
        while True:
            try:
                pages = self.allocator.grow(request.request_id, num_new)
            except RequestTooLargeError as error:
                self._drop_running(request, budget, f"cannot grow: {error}")
                return False
            if pages is not None:
                return True
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                self._drop_running(
                    request, budget, "cannot grow even with no other request running"
                )
                return False
            self._preempt(victim, budget)
            if victim is request:
                return False

    def _schedule_waiting(self, budget: _Budget) -> None:
        """Admit waiting requests first-come first-served; stop at the first that does
        not fit (FCFS: no request overtakes the head of the queue)."""
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_uncomputed, budget.tokens)
            admitted = self._admit(request, num_new, budget)
            if admitted is None:
                continue  # rejected and dropped from the queue: try the next one
            if not admitted:
                return
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            budget.chunks.append(self._chunk(request, num_new, is_new=True))
            budget.tokens -= num_new

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

    def _chunk(self, request: SchedRequest, num_new: int, *, is_new: bool) -> ScheduledChunk:
        start = request.num_computed
        recompute = max(0, min(start + num_new, request.num_computed_peak) - start)
        is_decode = num_new == 1 and start >= request.spec.prompt_tokens and recompute == 0
        return ScheduledChunk(request.request_id, start, num_new, recompute, is_decode, is_new)

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
            plan: the plan returned by the last `schedule()`.
            stopped: requests the caller ends now although they have output tokens left
                (the engine's end-of-sequence token); they finish like the others.
        Returns:
            The requests that sampled a token, and those that finished (their memory freed).
        """
        stop = set(stopped)
        emitted: list[int] = []
        finished: list[int] = []
        for chunk in plan.chunks:
            request = self.requests[chunk.request_id]
            if request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed += chunk.num_tokens
            request.num_computed_peak = max(request.num_computed_peak, request.num_computed)
            if request.num_computed < request.num_tokens:
                continue
            request.num_output += 1
            emitted.append(request.request_id)
            if request.num_output >= request.spec.output_tokens or request.request_id in stop:
                finished.append(request.request_id)
        self._release(finished)
        return StepOutcome(tuple(emitted), tuple(finished))

    def _release(self, finished: list[int]) -> None:
        if not finished:
            return
        done = set(finished)
        for request_id in finished:
            self.allocator.free(request_id)
            self.requests[request_id].status = RequestStatus.FINISHED
        self.running = [r for r in self.running if r.request_id not in done]
