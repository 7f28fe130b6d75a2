"""Scheduler behaviour on hand-built traces, with the exact-bytes test allocator."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory.spec import MemoryConfig, RequestUnits
from avmp.sched.scheduler import RequestStatus, Scheduler, SchedulerConfig, StepPlan
from avmp.sched.swap import PreemptionCosts
from sched_helpers import MIB, ExactBytesAllocator, make_allocator, req, run_to_end, tiny_geometry

# tiny geometry: 2 KiB of KV per token, 16-token pages of 32 KiB, 512 KiB state slots
PAGE = 32 * 1024
SLOT = 512 * 1024


# preemption and admission policies the random traces run under (a small host tier
# so that it fills and swap falls back to recompute)
POLICIES = [
    {},
    {"preemption": "swap", "host_tier_bytes": 3 * SLOT},
    {"preemption": "auto", "host_tier_bytes": 64 * MIB, "costs": PreemptionCosts(1e-4, 1e9)},
    {"admission": "reserve"},
    {"admission": "sglang", "preemption": "swap", "host_tier_bytes": 64 * MIB},
]


def test_chunked_prefill_respects_the_token_budget() -> None:
    scheduler = Scheduler(make_allocator(), SchedulerConfig(max_num_batched_tokens=32))
    scheduler.add_request(req(0, prompt=100, output=3))
    plans = run_to_end(scheduler)
    chunks = [(c.start, c.num_tokens, c.is_decode) for p in plans for c in p.chunks]
    assert chunks == [
        (0, 32, False),
        (32, 32, False),
        (64, 32, False),
        (96, 4, False),
        (100, 1, True),
        (101, 1, True),
    ]
    assert scheduler.requests[0].status is RequestStatus.FINISHED
    assert scheduler.allocator.request_ids == []


def test_first_token_is_sampled_when_the_prompt_is_done() -> None:
    scheduler = Scheduler(make_allocator(), SchedulerConfig(max_num_batched_tokens=64))
    scheduler.add_request(req(0, prompt=100, output=2))
    first = scheduler.finish_step(scheduler.schedule())
    second = scheduler.finish_step(scheduler.schedule())
    third = scheduler.finish_step(scheduler.schedule())
    assert (first.emitted, second.emitted, third.emitted) == ((), (0,), (0,))
    assert third.finished == (0,)


def test_budget_is_shared_running_first_then_waiting_in_arrival_order() -> None:
    scheduler = Scheduler(make_allocator(), SchedulerConfig(max_num_batched_tokens=50))
    for i in range(3):
        scheduler.add_request(req(i, prompt=30, output=5))
    plan = scheduler.schedule()
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [(0, 30), (1, 20)]
    scheduler.finish_step(plan)
    plan = scheduler.schedule()
    # request 0 decodes, request 1 finishes its prompt, request 2 starts with the rest
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [(0, 1), (1, 10), (2, 30)]


@pytest.mark.parametrize("max_num_seqs, budget", [(1, 64), (3, 16), (8, 100), (64, 8192)])
def test_limits_hold_on_a_random_trace(max_num_seqs: int, budget: int) -> None:
    rng = random.Random(max_num_seqs)
    scheduler = Scheduler(make_allocator(8), SchedulerConfig(max_num_seqs, budget))
    specs = [req(i, rng.randint(1, 300), rng.randint(1, 40)) for i in range(40)]
    for spec in specs:
        scheduler.add_request(spec)
    emitted = {spec.request_id: 0 for spec in specs}
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        assert plan.num_tokens <= budget
        assert len(plan.chunks) <= max_num_seqs
        assert scheduler.num_running <= max_num_seqs
        assert len({c.request_id for c in plan.chunks}) == len(plan.chunks)
        for request_id in scheduler.finish_step(plan).emitted:
            emitted[request_id] += 1
        scheduler.allocator.check_integrity()
        scheduler.check_integrity()
    assert emitted == {spec.request_id: spec.output_tokens for spec in specs}
    assert all(r.status is RequestStatus.FINISHED for r in scheduler.requests.values())


def test_fcfs_a_blocked_head_is_not_overtaken() -> None:
    # 2 MiB: request 0 holds 1.5 MiB of KV + a slot; request 1 (long) cannot be admitted
    # until 0 finishes, and request 2 (short, would fit) must wait behind it.
    allocator = make_allocator(2)
    scheduler = Scheduler(allocator, SchedulerConfig())
    scheduler.add_request(req(0, prompt=700, output=4))
    scheduler.add_request(req(1, prompt=700, output=4))
    scheduler.add_request(req(2, prompt=10, output=4))
    admitted: list[int] = []
    for plan in run_to_end(scheduler):
        admitted += [c.request_id for c in plan.chunks if c.is_new]
    assert admitted == [0, 1, 2]


def test_preemption_frees_the_last_admitted_and_requeues_it_at_the_front() -> None:
    # room for 3 slots and 20 pages: three 64-token prompts (4 pages each) fit, growing
    # all of them to 100+ tokens does not
    budget = 3 * SLOT + 20 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    scheduler = Scheduler(allocator, SchedulerConfig())
    for i in range(3):
        scheduler.add_request(req(i, prompt=64, output=60))
    scheduler.add_request(req(3, prompt=8, output=2))
    preempted: list[int] = []
    while not preempted:
        plan = scheduler.schedule()
        preempted = list(plan.preempted)
        scheduler.finish_step(plan)
    assert preempted == [2]
    assert [r.request_id for r in scheduler.waiting][:2] == [2, 3]
    assert 2 not in allocator.request_ids
    assert scheduler.num_preemptions == 1
    assert scheduler.requests[2].num_computed == 0


def test_preempted_request_is_recomputed_and_completes() -> None:
    budget = 3 * SLOT + 20 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    scheduler = Scheduler(allocator, SchedulerConfig())
    for i in range(3):
        scheduler.add_request(req(i, prompt=64, output=60))
    emitted = dict.fromkeys(range(3), 0)
    recompute_chunks = []
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        recompute_chunks += [c for c in plan.chunks if c.num_recompute_tokens]
        assert plan.num_recompute_tokens == sum(c.num_recompute_tokens for c in plan.chunks)
        for request_id in scheduler.finish_step(plan).emitted:
            emitted[request_id] += 1
        allocator.check_integrity()
        scheduler.check_integrity()
    assert scheduler.num_preemptions >= 1
    assert recompute_chunks, "a preempted request must be recomputed"
    first = recompute_chunks[0]
    assert first.is_new and first.start == 0 and not first.is_decode
    # it recomputes its prompt and the outputs it had sampled, then samples the next one
    assert first.num_recompute_tokens > 64
    assert emitted == dict.fromkeys(range(3), 60)


def test_no_admission_in_a_step_that_preempted() -> None:
    budget = 3 * SLOT + 20 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    scheduler = Scheduler(allocator, SchedulerConfig())
    for i in range(3):
        scheduler.add_request(req(i, prompt=64, output=60))
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        if plan.preempted:
            assert not [c for c in plan.chunks if c.is_new]
        scheduler.finish_step(plan)


def test_request_larger_than_memory_is_rejected_with_a_reason() -> None:
    scheduler = Scheduler(make_allocator(2), SchedulerConfig())
    rejection = scheduler.add_request(req(0, prompt=5000, output=10))
    scheduler.add_request(req(1, prompt=10, output=2))
    assert rejection is not None and "do not fit even in an empty memory" in rejection.reason
    plan = scheduler.schedule()
    assert plan.rejected == (rejection,)
    assert [c.request_id for c in plan.chunks] == [1]
    scheduler.finish_step(plan)
    run_to_end(scheduler)
    assert scheduler.requests[0].status is RequestStatus.REJECTED
    assert scheduler.requests[1].status is RequestStatus.FINISHED
    assert scheduler.rejections == [rejection]


class _LyingAllocator(ExactBytesAllocator):
    """Claims that everything fits, then refuses admissions above 100 tokens."""

    def fits_alone(self, num_tokens: int) -> bool:
        return True

    def admit(self, request_id: int, num_tokens: int) -> RequestUnits | None:
        if num_tokens > 100:
            return None
        return super().admit(request_id, num_tokens)


def test_request_that_cannot_be_admitted_into_empty_memory_is_not_retried_forever() -> None:
    scheduler = Scheduler(
        _LyingAllocator(tiny_geometry(), MemoryConfig(4 * MIB)), SchedulerConfig()
    )
    scheduler.add_request(req(0, prompt=500, output=2))
    scheduler.add_request(req(1, prompt=50, output=2))
    plans = run_to_end(scheduler, max_steps=10)
    assert [r.request_id for r in plans[0].rejected] == [0]
    assert "empty memory" in plans[0].rejected[0].reason
    assert scheduler.requests[1].status is RequestStatus.FINISHED


def test_stopped_request_finishes_early_and_frees_memory() -> None:
    scheduler = Scheduler(make_allocator(), SchedulerConfig())
    scheduler.add_request(req(0, prompt=10, output=50))
    scheduler.add_request(req(1, prompt=10, output=50))
    outcome = scheduler.finish_step(scheduler.schedule(), stopped=[1])
    assert outcome.emitted == (0, 1) and outcome.finished == (1,)
    assert scheduler.allocator.request_ids == [0]
    assert [r.request_id for r in scheduler.running] == [0]


def test_stop_finishes_a_running_or_a_preempted_request() -> None:
    budget = 3 * SLOT + 20 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    scheduler = Scheduler(allocator, SchedulerConfig())
    for i in range(3):
        scheduler.add_request(req(i, prompt=64, output=60))
    plan = scheduler.schedule()
    with pytest.raises(RuntimeError, match="outstanding"):
        scheduler.stop(0)
    scheduler.finish_step(plan)
    while not plan.preempted:  # grow all three until 2 is preempted back to the queue
        plan = scheduler.schedule()
        scheduler.finish_step(plan)
    assert scheduler.stop(0) and 0 not in allocator.request_ids
    assert [r.request_id for r in scheduler.waiting] == [2]
    assert scheduler.stop(2) and not scheduler.waiting
    assert not scheduler.stop(2)  # finished already
    assert [r.status for r in scheduler.requests.values()] == [
        RequestStatus.FINISHED, RequestStatus.RUNNING, RequestStatus.FINISHED
    ]
    scheduler.check_integrity()
    run_to_end(scheduler)


def test_plans_are_finished_once_and_in_order() -> None:
    scheduler = Scheduler(make_allocator(), SchedulerConfig())
    scheduler.add_request(req(0, prompt=10, output=5))
    plan = scheduler.schedule()
    with pytest.raises(RuntimeError, match="before finish_step"):
        scheduler.schedule()
    scheduler.finish_step(plan)
    with pytest.raises(RuntimeError, match="last schedule"):
        scheduler.finish_step(plan)


def test_an_empty_plan_needs_no_finishing() -> None:
    scheduler = Scheduler(make_allocator(2), SchedulerConfig())
    scheduler.add_request(req(0, prompt=100_000, output=5))  # rejected at once
    first = scheduler.schedule()
    assert first.is_empty and [r.request_id for r in first.rejected] == [0]
    assert scheduler.schedule().is_empty  # no finish_step in between: allowed


def test_duplicate_request_id_is_an_error() -> None:
    scheduler = Scheduler(make_allocator(), SchedulerConfig())
    scheduler.add_request(req(0, prompt=10, output=5))
    with pytest.raises(ValueError, match="already added"):
        scheduler.add_request(req(0, prompt=10, output=5))


@pytest.mark.parametrize("kwargs", [{"max_num_seqs": 0}, {"max_num_batched_tokens": 0}])
def test_config_rejects_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)


def test_same_trace_gives_the_same_plans() -> None:
    def plans() -> list[StepPlan]:
        rng = random.Random(7)
        scheduler = Scheduler(make_allocator(4), SchedulerConfig(16, 128))
        for i in range(30):
            scheduler.add_request(req(i, rng.randint(1, 400), rng.randint(1, 30)))
        return run_to_end(scheduler)

    assert plans() == plans()


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 600), st.integers(1, 30)), min_size=1, max_size=25),
    budget_pages=st.integers(0, 200),
    max_num_seqs=st.integers(1, 8),
    max_tokens=st.integers(1, 300),
    stop_every=st.integers(0, 7),
    policy=st.sampled_from(POLICIES),
)
def test_random_traces_keep_every_invariant_and_finish(
    lengths: list[tuple[int, int]],
    budget_pages: int,
    max_num_seqs: int,
    max_tokens: int,
    stop_every: int,
    policy: dict[str, object],
) -> None:
    """Whatever the trace, limits and policy: invariants hold after each step, each plan
    respects the limits, and every request ends finished (all its tokens emitted, or
    stopped) or rejected because it could not fit alone."""
    budget = 2 * SLOT + budget_pages * PAGE + 2 * MIB
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget))
    scheduler = Scheduler(allocator, SchedulerConfig(max_num_seqs, max_tokens, **policy))  # type: ignore[arg-type]
    specs = [req(i, prompt, output) for i, (prompt, output) in enumerate(lengths)]
    for spec in specs:
        scheduler.add_request(spec)
    emitted = dict.fromkeys(range(len(specs)), 0)
    stopped: set[int] = set()
    for step in range(100_000):
        if not scheduler.has_unfinished:
            break
        plan = scheduler.schedule()
        assert plan.num_tokens <= max_tokens and len(plan.chunks) <= max_num_seqs
        stop = [c.request_id for c in plan.chunks if stop_every and c.request_id % stop_every == 1]
        outcome = scheduler.finish_step(plan, stopped=stop[:1] if step % 5 == 0 else [])
        stopped |= {r for r in outcome.finished if r in stop}
        for request_id in outcome.emitted:
            emitted[request_id] += 1
        allocator.check_integrity()
        scheduler.check_integrity()
    assert not scheduler.has_unfinished
    rejected = {r.request_id for r in scheduler.rejections}
    for spec in specs:
        request = scheduler.requests[spec.request_id]
        if spec.request_id in rejected:
            assert not allocator.fits_alone(spec.total_tokens)
        elif spec.request_id not in stopped:
            assert request.status is RequestStatus.FINISHED
            assert emitted[spec.request_id] == spec.output_tokens
    assert allocator.request_ids == []


def test_forget_drops_finished_records_only() -> None:
    scheduler = Scheduler(make_allocator(), SchedulerConfig(max_num_batched_tokens=64))
    scheduler.add_request(req(0, prompt=10, output=1))
    scheduler.add_request(req(1, prompt=10, output=50))
    scheduler.finish_step(scheduler.schedule())  # request 0 finishes, 1 runs on
    with pytest.raises(ValueError, match="request 1 is running"):
        scheduler.forget(1)
    scheduler.forget(0)
    scheduler.forget(0)  # gone already: ignored
    scheduler.forget(99)  # never known: ignored
    assert list(scheduler.requests) == [1]
    run_to_end(scheduler)
    scheduler.forget(1)
    assert not scheduler.requests
    scheduler.check_integrity()
