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

from avmp.memory.host_tier import HostTier
from avmp.memory.spec import (
    NO_SLOT,
    CacheAllocator,
    PoolKind,
    RequestTooLargeError,
    RequestUnits,
)
from avmp.sched.admission import GrowthEstimate
from avmp.sched.prefix import (
    CheckpointCopy,
    PrefixCache,
    PrefixCacheConfig,
    SlotCopier,
    TokenSource,
    build_prefix_cache,
)
from avmp.sched.request import RequestSpec
from avmp.sched.swap import (
    Admission,
    PreemptionCosts,
    PreemptionMode,
    SwapCopy,
    Swapper,
    parse_choice,
)


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits.

    Attributes:
        max_num_seqs: running requests at most (a request holds a state slot while running).
        max_num_batched_tokens: tokens computed per step at most, over all requests
            (prefill chunks and decode tokens alike).
        preemption: how a preempted request gives its memory back (`PreemptionMode`).
        admission: when a waiting request may start (`Admission`).
        host_tier_bytes: bytes of the host tier that swapped-out requests go to.
        costs: the rates the ``auto`` preemption rule compares (needed for ``auto``).
        prefix_cache: how cached prefixes are kept and reused (`avmp.sched.prefix`);
            None: no prefix caching.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    preemption: PreemptionMode = PreemptionMode.RECOMPUTE
    admission: Admission = Admission.GREEDY
    host_tier_bytes: int = 0
    costs: PreemptionCosts | None = None
    prefix_cache: PrefixCacheConfig | None = None

    def __post_init__(self) -> None:
        # names given as plain strings (from a CLI or a file) become members here
        object.__setattr__(
            self, "preemption", parse_choice(PreemptionMode, "preemption", self.preemption)
        )
        object.__setattr__(self, "admission", parse_choice(Admission, "admission", self.admission))
        if self.host_tier_bytes < 0:
            raise ValueError(f"host_tier_bytes must be >= 0, got {self.host_tier_bytes}")
        if self.preemption is not PreemptionMode.RECOMPUTE and self.host_tier_bytes == 0:
            raise ValueError(f"preemption {self.preemption.value!r} needs a host tier (0 bytes)")
        if self.preemption is PreemptionMode.AUTO and self.costs is None:
            raise ValueError("preemption 'auto' needs the costs it compares")
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
    order, then newly admitted ones), who was preempted or rejected while planning, how
    many of the chunks' tokens are recompute after a preemption, and the copies to and
    from the host tier that planning issued (swapped-out victims, resumed requests), and
    the checkpoints that prefix-cache hits copy into their requests' slots first."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[int, ...]
    rejected: tuple[Rejection, ...]
    num_recompute_tokens: int = 0
    swapped_out: tuple[SwapCopy, ...] = ()
    swapped_in: tuple[SwapCopy, ...] = ()
    restored: tuple[CheckpointCopy, ...] = ()

    @property
    def num_swap_bytes(self) -> int:
        """Bytes copied between the device and the host tier for this step."""
        return sum(c.num_bytes for c in self.swapped_out) + sum(
            c.num_bytes for c in self.swapped_in
        )

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class StepOutcome:
    """What a step produced: requests that sampled a token (in plan order), those that
    finished, and the checkpoints the prefix cache took (each slot's state to copy
    before the next step writes it)."""

    emitted: tuple[int, ...]
    finished: tuple[int, ...]
    checkpointed: tuple[CheckpointCopy, ...] = ()


@dataclass
class _Budget:
    """A plan being built: the tokens left in the step's budget and what was decided."""

    tokens: int
    num_recompute_tokens: int = 0
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    swapped_out: list[SwapCopy] = field(default_factory=list)
    swapped_in: list[SwapCopy] = field(default_factory=list)
    restored: list[CheckpointCopy] = field(default_factory=list)


class Scheduler:
    """Continuous batching with chunked prefill, FCFS admission and preemption, over any
    `CacheAllocator`.

    ``running`` keeps admission order; ``waiting`` is FCFS with preempted requests put
    back at its front. Preemption (``config.preemption``): ``recompute`` and ``swap``
    take the most recently admitted running request as the victim (vLLM's rule);
    ``auto`` takes, among the requests not yet served in this step, the one whose loss
    costs least (recompute or swap, whichever is cheaper for it), the latest admitted on
    a tie. A swapped-out request keeps its computed tokens in the host tier and resumes
    from them; when the tier is full it is recomputed instead.

    Args:
        swapper: carries out the host-tier copies (the engine); None to only count them
            (the simulator).
        slot_copier: carries out the prefix cache's slot copies (hits, checkpoints), at
            once; None to only count them.
        token_source: the requests' token ids, by id (the engine): the prefix cache keys
            units by them (`avmp.sched.prefix.TokenUnits`); None: by the specs' content
            segments (the simulator).
    """

    def __init__(
        self,
        allocator: CacheAllocator,
        config: SchedulerConfig,
        swapper: Swapper | None = None,
        slot_copier: SlotCopier | None = None,
        token_source: TokenSource | None = None,
    ) -> None:
        self.allocator = allocator
        self.config = config
        self.swapper = swapper
        self.requests: dict[int, SchedRequest] = {}
        self.waiting: deque[SchedRequest] = deque()
        self.running: list[SchedRequest] = []
        self.rejections: list[Rejection] = []
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_swapped_in = 0
        self.host_tier = HostTier(config.host_tier_bytes)
        self.growth = GrowthEstimate(config.admission)
        self._page_unit_bytes = self._slot_unit_bytes = 0
        if config.preemption is not PreemptionMode.RECOMPUTE:
            cache_format = allocator.cache_format()
            self._page_unit_bytes = cache_format.page.unit_bytes
            self._slot_unit_bytes = cache_format.slot.unit_bytes
        self._pending_rejections: list[Rejection] = []
        self._outstanding: StepPlan | None = None
        self.prefix: PrefixCache | None = None
        if config.prefix_cache is not None:
            self.prefix = build_prefix_cache(
                allocator, config.prefix_cache, slot_copier, token_source
            )

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
            tuple(budget.swapped_out),
            tuple(budget.swapped_in),
            tuple(budget.restored),
        )
        self.growth.after_step(bool(budget.preempted), self.running)
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
            if self.prefix is not None:  # a prefill chunk ends where a checkpoint is due
                num_new = self.prefix.chunk_limit(request.request_id, request.num_computed, num_new)
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
            victim = self._victim(request)
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

    def _victim(self, request: SchedRequest) -> SchedRequest:
        """Whom to preempt so that ``request`` can grow: the latest admitted running
        request, or under ``auto`` the cheapest loss among ``request`` and those admitted
        after it (the ones before it already have their chunks in this step)."""
        running = self.running
        if self.config.preemption is not PreemptionMode.AUTO or running[-1] is request:
            return running[-1]
        start = running.index(request)
        best, best_s = running[-1], self._loss_s(running[-1])
        for candidate in reversed(running[start:-1]):  # latest first: ties keep the latest
            loss_s = self._loss_s(candidate)
            if loss_s < best_s:
                best, best_s = candidate, loss_s
        return best

    def _loss_s(self, request: SchedRequest) -> float:
        """Device time that preempting ``request`` costs: recompute or swap, the cheaper."""
        costs = self.config.costs
        assert costs is not None  # `auto` needs them (SchedulerConfig checks)
        recompute_s = costs.recompute_s(request.num_computed)
        num_bytes = self._swap_bytes(self.allocator.units(request.request_id))
        if not self.host_tier.could_reserve(num_bytes):
            return recompute_s
        return min(recompute_s, costs.swap_s(num_bytes))

    def _swap_bytes(self, units: RequestUnits) -> int:
        """Bytes a request's units take in the host tier: its slot and its pages."""
        slot_bytes = self._slot_unit_bytes if units.slot != NO_SLOT else 0
        return slot_bytes + len(units.pages) * self._page_unit_bytes

    def _try_grow(self, request: SchedRequest, num_new: int, budget: _Budget) -> bool | None:
        """Grow ``request`` by ``num_new`` tokens: True if it grew, False if memory is
        short, None if it can never fit (it was dropped from `running`, with a reason)."""
        try:
            if self.prefix is not None:  # cached pages may yield before capacity moves
                held = request.num_computed
                allocator = self.allocator
                num_pages = allocator.kv_units_for(held + num_new) - allocator.kv_units_for(held)
                if num_pages:
                    self.prefix.make_room(num_pages, 0)
            grown = self.allocator.grow(request.request_id, num_new) is not None
            while not grown and self.prefix is not None and self.prefix.reclaim(PoolKind.KV):
                grown = self.allocator.grow(request.request_id, num_new) is not None
            return grown
        except RequestTooLargeError as error:
            self._drop_running(request, budget, f"cannot grow: {error}")
            return None

    def _schedule_waiting(self, budget: _Budget) -> None:
        """Admit waiting requests first-come first-served; stop at the first that does
        not fit (FCFS: no request overtakes the head of the queue)."""
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self.growth.admits(self.allocator, self.running, request):
                return
            cached = self._match_prefix(request)
            num_new = min(request.num_tokens - request.num_computed, budget.tokens)
            if self.prefix is not None:
                num_new = self.prefix.chunk_limit(request.request_id, request.num_computed, num_new)
            admitted = self._admit(request, num_new, budget, cached)
            if cached is not None and admitted:
                self._count_prefix_hit(request, budget)
            elif cached is not None:
                assert self.prefix is not None
                self.prefix.not_admitted(request.request_id)
                request.num_computed = 0
            if admitted is None:
                continue  # rejected and dropped from the queue: try the next one
            if not admitted:
                return
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_chunk(request, num_new, budget, is_new=True)

    def _match_prefix(self, request: SchedRequest) -> list[int] | None:
        """Match a request that starts from scratch against the prefix cache: it starts
        after its hit. Returns the cached page keys it adopts (None: no prefix cache, or
        a swapped-out request that resumes its own copy)."""
        if self.prefix is None or request.num_computed:
            return None
        spec = request.spec
        hit_tokens, keys = self.prefix.match(
            request.request_id, request.prompt_tokens, spec.content(), spec.total_tokens,
            reads_cache=spec.reads_prefix_cache,
        )  # fmt: skip
        request.num_computed = hit_tokens
        request.num_computed_peak = max(request.num_computed_peak, hit_tokens)
        return keys

    def _short_pool_on_admission(self) -> PoolKind:
        """The pool an admission that failed most likely found short: the state pool
        while cached checkpoints hold slots (a request needs one), else the KV pool."""
        usage = self.allocator.usage()
        return PoolKind.STATE if usage.state_cached_bytes else PoolKind.KV

    def _count_prefix_hit(self, request: SchedRequest, budget: _Budget) -> None:
        assert self.prefix is not None
        if request.num_preemptions == 0:  # first admission only
            self.prefix.admitted(request.request_id, request.prompt_tokens, request.num_computed)
        self.prefix.served(request.request_id)
        copy = self.prefix.restore(request.request_id)
        if copy is not None:
            budget.restored.append(copy)

    def _admit(
        self, request: SchedRequest, num_new: int, budget: _Budget, cached: list[int] | None = None
    ) -> bool | None:
        """Ask for the request's slot and first chunk's pages (after the cached pages it
        adopts, if any); evict cached units before giving up.

        Returns:
            True if admitted, False if memory is short now, None if the request was
            rejected: one that does not fit while no other request holds memory never will.
        """
        num_tokens = request.num_computed + num_new
        try:
            if self.prefix is not None:  # cached units may yield before capacity moves
                num_pages = self.allocator.kv_units_for(num_tokens) - len(cached or ())
                self.prefix.make_room(num_pages, int(self.prefix.tree.has_state))
            if cached:
                blocks = self.allocator.admit(request.request_id, num_tokens, cached)
            else:
                blocks = self.allocator.admit(request.request_id, num_tokens)
            while blocks is None and self.prefix is not None and self.prefix.reclaim(
                self._short_pool_on_admission()
            ):
                blocks = self.allocator.admit(request.request_id, num_tokens, cached or ())
        except RequestTooLargeError as error:
            blocks = None
            reason = f"cannot be admitted: {error}"
        else:
            reason = "cannot be admitted even into an empty memory"
        if blocks is not None:
            if self.host_tier.holds(request.request_id):  # resumes from its copy
                self._swap_in(request, blocks, budget)
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
        """Free all of ``victim``'s memory, after copying it to the host tier when the
        policy swaps it, and put it at the front of the queue."""
        self.running.remove(victim)  # the last element, or close to it
        if self.prefix is not None:
            self.prefix.forget(victim.request_id)
        if not self._swap_out(victim, budget):
            victim.num_computed = 0
        self.allocator.free(victim.request_id)
        victim.num_preemptions += 1
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        budget.preempted.append(victim.request_id)

    def _swap_out(self, victim: SchedRequest, budget: _Budget) -> bool:
        """Copy ``victim``'s units to the host tier if the policy says so and the tier
        has room; returns whether it did (else the victim is recomputed)."""
        mode = self.config.preemption
        if mode is PreemptionMode.RECOMPUTE:
            return False
        units = self.allocator.units(victim.request_id)
        num_bytes = self._swap_bytes(units)
        if mode is PreemptionMode.AUTO:
            costs = self.config.costs
            assert costs is not None
            if costs.recompute_s(victim.num_computed) <= costs.swap_s(num_bytes):
                return False
        extent = self.host_tier.reserve(victim.request_id, num_bytes)
        if extent is None:
            return False
        if self.swapper is not None:
            self.swapper.swap_out(victim.request_id, units, extent)
        self.num_swapped_out += 1
        budget.swapped_out.append(SwapCopy(victim.request_id, victim.num_computed, num_bytes))
        return True

    def _swap_in(self, request: SchedRequest, units: RequestUnits, budget: _Budget) -> None:
        """Copy a resumed request's saved units back and free its host extent."""
        extent = self.host_tier.extent(request.request_id)
        if self.swapper is not None:
            self.swapper.swap_in(request.request_id, units, extent)
        self.host_tier.release(request.request_id)
        self.num_swapped_in += 1
        budget.swapped_in.append(
            SwapCopy(request.request_id, request.num_computed, extent.num_bytes)
        )

    def _drop_swapped(self, request: SchedRequest) -> None:
        """Forget a waiting request's host copy (it finished or was rejected)."""
        if self.host_tier.holds(request.request_id):
            self.host_tier.release(request.request_id)
            request.num_computed = 0

    def _drop_running(self, request: SchedRequest, budget: _Budget, reason: str) -> None:
        self.running.remove(request)
        if self.prefix is not None:
            self.prefix.forget(request.request_id)
        self.allocator.free(request.request_id)
        budget.rejected.append(self._reject(request, reason))

    def _reject(self, request: SchedRequest, reason: str) -> Rejection:
        self._drop_swapped(request)
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
            if self.prefix is not None:  # before a finished request's memory goes
                self.prefix.computed(request.request_id, computed)
            if computed < request.num_tokens:
                continue  # a prefill chunk that did not reach the end: nothing sampled
            request.num_output += 1
            request.num_tokens += 1
            emitted.append(request.request_id)
            if request.num_output >= request.output_tokens or request.request_id in stop:
                finished.append(request.request_id)
        self._release(finished)
        taken = self.prefix.drain_taken() if self.prefix is not None else ()
        return StepOutcome(tuple(emitted), tuple(finished), taken)

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
            self._drop_swapped(request)
            request.status = RequestStatus.FINISHED
            self.growth.observe_finish(request.num_output, request.output_tokens)
        else:
            return False
        return True

    def forget(self, request_id: int) -> None:
        """Drop the record of a finished or rejected request (unknown ids are ignored).
        A server runs for days: without this it would keep one record per request it ever
        served.

        Raises:
            ValueError: the request is still waiting or running.
        """
        request = self.requests.get(request_id)
        if request is None:
            return
        if request.status in (RequestStatus.WAITING, RequestStatus.RUNNING):
            raise ValueError(f"request {request_id} is {request.status}, not finished")
        del self.requests[request_id]

    def _release(self, finished: list[int]) -> None:
        if not finished:
            return
        done = set(finished)
        for request_id in finished:
            if self.prefix is not None:  # its slot may become its final checkpoint
                self.prefix.free(request_id)
            else:
                self.allocator.free(request_id)
            request = self.requests[request_id]
            request.status = RequestStatus.FINISHED
            self.growth.observe_finish(request.num_output, request.output_tokens)
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
            if self.host_tier.holds(request.request_id):  # swapped out, keeps its tokens
                assert 0 < request.num_computed < request.num_tokens
            else:
                assert request.num_computed == 0, f"{request.request_id}: waiting with a cache"
        waiting_ids = {r.request_id for r in self.waiting}
        assert set(self.host_tier.request_ids) <= waiting_ids, "the host tier holds others"
        if self.prefix is not None:
            self.prefix.check_integrity()
        self.host_tier.check_integrity()
        queued = len(self.running) + len(self.waiting)
        assert len(set(running_ids) | {r.request_id for r in self.waiting}) == queued
        for request in self.requests.values():
            assert request.num_output <= request.output_tokens
            assert request.num_tokens == request.prompt_tokens + request.num_output
