"""Preemption that keeps its work: swapping to the host tier, the cost rule and the
victim it picks, and growth-aware admission."""

from __future__ import annotations

import pytest

from avmp.memory.host_tier import HostExtent
from avmp.memory.spec import MemoryConfig, RequestUnits
from avmp.sched.scheduler import RequestStatus, Scheduler, SchedulerConfig, StepPlan
from avmp.sched.swap import Admission, PreemptionCosts, PreemptionMode
from sched_helpers import MIB, ExactBytesAllocator, req, run_to_end, tiny_geometry

# tiny geometry: 2 KiB of KV per token, 16-token pages of 32 KiB, 512 KiB state slots
PAGE = 32 * 1024
SLOT = 512 * 1024
KV_PER_TOKEN = 2048


class RecordingSwapper:
    """Records every copy, checking what the scheduler promises about the units."""

    def __init__(self, allocator: ExactBytesAllocator) -> None:
        self.allocator = allocator
        self.calls: list[tuple[str, int, RequestUnits, HostExtent]] = []

    def swap_out(self, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        assert request_id in self.allocator.request_ids, "swap_out after the free"
        assert self.allocator.units(request_id) == units
        assert extent.num_bytes == SLOT + len(units.pages) * PAGE
        self.calls.append(("out", request_id, units, extent))

    def swap_in(self, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        assert self.allocator.units(request_id) == units, "swap_in before the admission"
        saved = (extent.num_bytes - SLOT) // PAGE
        assert len(units.pages) >= saved
        self.calls.append(("in", request_id, units, extent))


def pressure(**policy: object) -> tuple[ExactBytesAllocator, Scheduler, RecordingSwapper]:
    """Room for 3 slots and 20 pages: three 64-token prompts fit, growing them to 100+
    tokens does not (the same setting as the recompute preemption test)."""
    budget = 3 * SLOT + 20 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    swapper = RecordingSwapper(allocator)
    scheduler = Scheduler(allocator, SchedulerConfig(**policy), swapper)  # type: ignore[arg-type]
    for i in range(3):
        scheduler.add_request(req(i, prompt=64, output=60))
    return allocator, scheduler, swapper


def step_until(scheduler: Scheduler, done: object) -> StepPlan:
    for _ in range(10_000):
        plan = scheduler.schedule()
        scheduler.finish_step(plan)
        scheduler.check_integrity()
        if done(plan):  # type: ignore[operator]
            return plan
    raise AssertionError("never happened")


def test_a_swapped_victim_keeps_its_tokens_and_resumes_without_recompute() -> None:
    allocator, scheduler, swapper = pressure(preemption="swap", host_tier_bytes=64 * MIB)
    plan = step_until(scheduler, lambda p: p.preempted)
    (victim,) = plan.preempted
    (copy,) = plan.swapped_out
    request = scheduler.requests[victim]
    assert copy.request_id == victim and scheduler.host_tier.holds(victim)
    assert request.num_computed == copy.num_tokens > 0
    assert scheduler.waiting[0] is request and victim not in allocator.request_ids
    assert scheduler.host_tier.holds(victim)
    plans = run_to_end(scheduler)
    assert sum(p.num_recompute_tokens for p in plans) == 0
    resumed = [p for p in plans if p.swapped_in]
    (back,) = resumed[0].swapped_in
    assert back == copy  # the same tokens and bytes come back
    first = next(c for c in resumed[0].chunks if c.request_id == victim)
    assert first.start == copy.num_tokens and first.num_recompute_tokens == 0
    assert [c[0] for c in swapper.calls if c[1] == victim][:2] == ["out", "in"]
    assert all(r.status is RequestStatus.FINISHED for r in scheduler.requests.values())
    assert scheduler.host_tier.used_bytes == 0
    assert scheduler.num_swapped_out == scheduler.num_swapped_in >= 1


def test_recompute_mode_never_swaps() -> None:
    _, scheduler, swapper = pressure()
    plans = run_to_end(scheduler)
    assert any(p.preempted for p in plans) and not swapper.calls
    assert sum(p.num_recompute_tokens for p in plans) > 0


def test_a_full_host_tier_falls_back_to_recompute() -> None:
    # the tier holds a slot but not a slot and the victim's pages
    _, scheduler, swapper = pressure(preemption="swap", host_tier_bytes=SLOT)
    plans = run_to_end(scheduler)
    assert any(p.preempted for p in plans) and not swapper.calls
    assert sum(p.num_recompute_tokens for p in plans) > 0


def test_auto_recomputes_short_contexts_and_swaps_long_ones() -> None:
    # crossover: 2 x (SLOT + n x 2 KiB) / bw = n x prefill; with bw = 1 GB/s and 20 us a
    # token, swapping wins above about 66 tokens
    costs = PreemptionCosts(prefill_s_per_token=20e-6, host_bytes_per_s=1e9)
    crossover = costs.crossover_tokens(SLOT, KV_PER_TOKEN)
    assert 60 < crossover < 70
    assert costs.recompute_s(100) > costs.swap_s(SLOT + 100 * KV_PER_TOKEN)
    assert costs.recompute_s(10) < costs.swap_s(SLOT + 10 * KV_PER_TOKEN)
    _, scheduler, _ = pressure(preemption="auto", host_tier_bytes=64 * MIB, costs=costs)
    plans = run_to_end(scheduler)
    swapped = [c for p in plans for c in p.swapped_out]
    victims = [
        (request_id, p)
        for p in plans
        for request_id in p.preempted
        if request_id not in {c.request_id for c in p.swapped_out}
    ]
    assert swapped and all(c.num_tokens > crossover for c in swapped)
    for request_id, plan in victims:  # recomputed victims were short
        assert request_id in plan.preempted


def test_crossover_is_infinite_when_copying_a_token_costs_more_than_computing_it() -> None:
    costs = PreemptionCosts(prefill_s_per_token=1e-9, host_bytes_per_s=1e9)
    assert costs.crossover_tokens(SLOT, KV_PER_TOKEN) == float("inf")


def test_auto_takes_the_cheapest_loss_not_the_latest_admitted() -> None:
    # 0 and 1 decode from short prompts; 2, admitted last, holds a long prompt. When 0
    # cannot grow, recomputing 1 costs least (swap is dear here): 1 goes, not 2 as the
    # latest-admitted rule would have it.
    budget = 3 * SLOT + 40 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    costs = PreemptionCosts(prefill_s_per_token=1e-3, host_bytes_per_s=1e3)
    config = SchedulerConfig(preemption="auto", host_tier_bytes=64 * MIB, costs=costs)  # type: ignore[arg-type]
    scheduler = Scheduler(allocator, config)
    scheduler.add_request(req(0, prompt=16, output=300))
    scheduler.add_request(req(1, prompt=16, output=300))
    scheduler.add_request(req(2, prompt=300, output=300))
    plan = step_until(scheduler, lambda p: p.preempted)
    assert plan.preempted[0] == 1
    assert not plan.swapped_out  # recompute was the cheaper loss


def test_latest_admitted_is_the_victim_under_recompute_and_swap() -> None:
    for policy in ({}, {"preemption": "swap", "host_tier_bytes": 64 * MIB}):
        _, scheduler, _ = pressure(**policy)
        plan = step_until(scheduler, lambda p: p.preempted)
        assert plan.preempted == (2,)


def test_stopping_a_swapped_request_frees_its_host_extent() -> None:
    _, scheduler, _ = pressure(preemption="swap", host_tier_bytes=64 * MIB)
    plan = step_until(scheduler, lambda p: p.preempted)
    (victim,) = plan.preempted
    assert scheduler.stop(victim)
    assert scheduler.host_tier.used_bytes == 0 and not scheduler.host_tier.holds(victim)
    scheduler.check_integrity()
    run_to_end(scheduler)


def growth_trace(admission: str) -> tuple[ExactBytesAllocator, list[StepPlan]]:
    """Six requests whose prompts fit together but whose outputs do not."""
    budget = 4 * SLOT + 40 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    scheduler = Scheduler(allocator, SchedulerConfig(admission=admission))  # type: ignore[arg-type]
    for i in range(6):
        scheduler.add_request(req(i, prompt=64, output=200))
    return allocator, run_to_end(scheduler)


def test_reserve_admission_avoids_the_preemptions_greedy_admission_causes() -> None:
    _, greedy = growth_trace("greedy")
    _, reserve = growth_trace("reserve")
    assert sum(len(p.preempted) for p in greedy) > 0
    assert sum(p.num_recompute_tokens for p in greedy) > 0
    assert sum(len(p.preempted) for p in reserve) == 0
    assert sum(p.num_recompute_tokens for p in reserve) == 0


def test_reserve_admission_counts_requests_that_finish_before_the_peak() -> None:
    # request 0 is almost done, 1 has long to go: the sum of their peaks (plus 2's)
    # does not fit, but 0 frees its memory before 1 and 2 grow into it
    budget = 3 * SLOT + 30 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    scheduler = Scheduler(allocator, SchedulerConfig(admission=Admission.RESERVE))
    scheduler.add_request(req(0, prompt=200, output=2))
    scheduler.add_request(req(1, prompt=16, output=150))
    scheduler.add_request(req(2, prompt=16, output=150))
    first = scheduler.schedule()
    scheduler.finish_step(first)
    assert {c.request_id for c in first.chunks} == {0, 1, 2}
    peaks = (200 + 1) + 2 * (16 + 149)
    assert peaks > 30 * 16  # summing peaks would have refused request 2
    plans = run_to_end(scheduler)
    assert not any(p.preempted for p in plans)


def test_sglang_ratio_decays_without_retraction_and_resets_after_one() -> None:
    # at ratio 0.7 three requests of 64 + 100 reserve 9 pages each (27 of 30) and are
    # admitted; they peak at 11 pages each, so one is retracted later
    budget = 3 * SLOT + 30 * PAGE
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(budget, chunk_bytes=2 * MIB))
    scheduler = Scheduler(allocator, SchedulerConfig(admission="sglang"))  # type: ignore[arg-type]
    for i in range(3):
        scheduler.add_request(req(i, prompt=64, output=100))
    start = scheduler.growth.ratio
    plan = scheduler.schedule()
    scheduler.finish_step(plan)
    assert len(plan.chunks) == 3 and scheduler.growth.ratio < start
    step_until(scheduler, lambda p: p.preempted)
    running = scheduler.running
    decoded = sum(r.num_output for r in running)
    limits = sum(r.output_tokens for r in running)
    assert scheduler.growth.ratio == pytest.approx(min(1.0, (decoded + 20 * len(running)) / limits))


def test_reserve_learns_the_share_of_outputs_that_stopped_early() -> None:
    allocator = ExactBytesAllocator(tiny_geometry(), MemoryConfig(64 * MIB))
    scheduler = Scheduler(allocator, SchedulerConfig(admission="reserve"))  # type: ignore[arg-type]
    scheduler.add_request(req(0, prompt=8, output=100))
    assert scheduler.growth.ratio == 1.0
    plan = scheduler.schedule()
    scheduler.finish_step(plan, stopped=[0])  # stopped after 1 of 100 tokens
    assert scheduler.growth.ratio == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preemption": "sometimes"}, "preemption must be one of recompute, swap, auto"),
        ({"admission": "lax"}, "admission must be one of greedy, reserve, sglang"),
        ({"preemption": "swap"}, "needs a host tier"),
        ({"preemption": "auto", "host_tier_bytes": 1}, "needs the costs"),
        ({"host_tier_bytes": -1}, "host_tier_bytes must be >= 0"),
    ],
)
def test_config_rejects_a_bad_policy(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_takes_names_and_members_alike() -> None:
    config = SchedulerConfig(preemption="swap", host_tier_bytes=1)  # type: ignore[arg-type]
    assert config.preemption is PreemptionMode.SWAP
    assert config.admission is Admission.GREEDY
    with pytest.raises(ValueError, match="must be > 0"):
        PreemptionCosts(0.0, 1.0)
