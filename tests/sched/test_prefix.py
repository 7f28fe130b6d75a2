"""The prefix tree and the scheduler with prefix caching: hits resume after a checkpoint,
chunks end where checkpoints are due, nothing in use is evicted, and every layout holds
the cache the same way."""

from __future__ import annotations

import pytest

from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.models.geometry import ModelGeometry
from avmp.sched.prefix import PrefixCacheConfig, unit_contents
from avmp.sched.request import RequestSpec
from avmp.sched.scheduler import Scheduler, SchedulerConfig, StepPlan
from sched_helpers import run_to_end, tiny_geometry

MIB = 1 << 20
LAYOUTS = ("avmp", "static", "unified", "oracle")


def test_unit_contents_agree_exactly_where_the_tokens_agree() -> None:
    a = unit_contents([("sys", 20), ("q1", 20)], 2, 16)
    b = unit_contents([("sys", 20), ("q2", 20)], 2, 16)
    assert a[0] == b[0] == (("sys", 0, 16),)
    assert a[1] == (("sys", 16, 4), ("q1", 0, 12)) and a[1] != b[1]
    assert len(unit_contents([("x", 40)], 5, 16)) == 2  # whole units only


def _scheduler(layout: str, policy: str | None, geometry: ModelGeometry | None = None,
               budget_mib: int = 64) -> Scheduler:  # fmt: skip
    geometry = geometry or tiny_geometry()
    allocator = make_allocator(layout, geometry, MemoryConfig(budget_mib * MIB))
    prefix = None
    if policy is not None:
        align = 0
        if policy == "vllm-align":
            align = max(allocator.kv_unit_tokens, 64)
        prefix = PrefixCacheConfig(policy, align_tokens=align)
    return Scheduler(allocator, SchedulerConfig(max_num_batched_tokens=256, prefix_cache=prefix))


def _turns(num_turns: int, first_id: int = 0) -> list[RequestSpec]:
    """One conversation: each turn's prompt is the whole history and a new message."""
    history: list[tuple[object, int]] = [("system", 600)]
    specs = []
    for turn in range(num_turns):
        history.append((("user", first_id, turn), 20))
        prompt = sum(n for _, n in history)
        output = ("answer", first_id, turn)
        specs.append(RequestSpec(first_id + turn, 0.0, prompt, 30, tuple(history), output))
        history.append((output, 30))
    return specs


def _run_turns(scheduler: Scheduler, specs: list[RequestSpec]) -> list[StepPlan]:
    plans: list[StepPlan] = []
    for spec in specs:  # each turn arrives once the last one is answered
        scheduler.add_request(spec)
        plans += run_to_end(scheduler)
    return plans


def _first_chunk_starts(plans: list[StepPlan]) -> dict[int, int]:
    starts: dict[int, int] = {}
    for plan in plans:
        for chunk in plan.chunks:
            starts.setdefault(chunk.request_id, chunk.start)
    return starts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_later_turn_resumes_after_the_last_turns_output(layout: str) -> None:
    scheduler = _scheduler(layout, "avmp")
    plans = _run_turns(scheduler, _turns(3))
    unit = scheduler.prefix.tree.unit_tokens  # type: ignore[union-attr]
    starts = _first_chunk_starts(plans)
    assert starts[0] == 0
    for turn in (1, 2):  # the previous turn's stream, cut to whole units
        previous = scheduler.requests[turn - 1].spec
        assert starts[turn] == (previous.total_tokens - 1) // unit * unit > 0
    stats = scheduler.prefix.stats  # type: ignore[union-attr]
    assert stats.num_hits == 2 and stats.num_hit_tokens == starts[1] + starts[2]
    assert stats.num_hit_tokens <= stats.num_ideal_tokens


def test_without_the_cache_every_turn_starts_from_nothing() -> None:
    plans = _run_turns(_scheduler("avmp", None), _turns(3))
    assert set(_first_chunk_starts(plans).values()) == {0}


def test_a_branch_point_gets_a_checkpoint_during_the_later_prefill() -> None:
    """Two prompts share a system prompt and a context: the second leaves the first's
    pages at the context's last whole page, takes a checkpoint there (its prefill chunk
    ends there), and a third resumes from it. (The first keeps the system prompt's end,
    48, its first segment's: the second resumes there.)"""
    scheduler = _scheduler("avmp", "avmp")
    specs = [RequestSpec(i, 0.0, 140, 5, (("sys", 60), ("ctx", 40), (("q", i), 40)))
             for i in range(3)]  # fmt: skip
    plans = _run_turns(scheduler, specs)
    ends = [c.start + c.num_tokens for p in plans for c in p.chunks if c.request_id == 1]
    assert 96 in ends  # the junction, page-aligned: 100 // 16 * 16
    assert _first_chunk_starts(plans) == {0: 0, 1: 48, 2: 96}


@pytest.mark.parametrize("policy", ["vllm-align", "sglang"])
def test_the_baselines_checkpoint_on_their_own_grid(policy: str) -> None:
    scheduler = _scheduler("avmp", policy)
    specs = [RequestSpec(i, 0.0, 300, 5, (("sys", 200), (("q", i), 100))) for i in range(2)]
    plans = _run_turns(scheduler, specs)
    start = _first_chunk_starts(plans)[1]
    prefix = scheduler.prefix
    assert prefix is not None
    grid = 64 if policy == "sglang" else prefix.tree.config.align_tokens
    assert start % grid == 0 and start <= 200


@pytest.mark.parametrize("layout", ["avmp", "static"])
def test_short_memory_evicts_cached_units_and_every_request_finishes(layout: str) -> None:
    """Cached units are reclaimable: under a budget that the live requests fill, the
    cache gives way (evictions) and every request still finishes."""
    scheduler = _scheduler(layout, "avmp", budget_mib=6)
    for conversation in range(6):
        for spec in _turns(2, first_id=conversation * 10):
            scheduler.add_request(spec)
    run_to_end(scheduler)
    assert all(r.status == "finished" for r in scheduler.requests.values())
    assert scheduler.prefix is not None
    tree = scheduler.prefix.tree
    assert tree.num_evicted_pages + tree.num_evicted_checkpoints > 0


def test_a_budget_without_room_for_a_checkpoint_is_refused() -> None:
    geometry = tiny_geometry(ssm_elements=600_000)  # a 1.2 MB slot: one fits in 2 MiB
    allocator = make_allocator("avmp", geometry, MemoryConfig(2 * MIB))
    with pytest.raises(ValueError, match="prefix caching needs room for a checkpoint"):
        Scheduler(allocator, SchedulerConfig(prefix_cache=PrefixCacheConfig("avmp")))


class _States:
    """What each slot holds, as the engine's slots would: the request's stream up to
    its computed tokens after every step, moved by the prefix cache's copies."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.slots: dict[int, tuple[object, ...]] = {}
        self.num_copies = 0

    def copy(self, src: int, dst: int) -> None:
        self.slots[dst] = self.slots[src]
        self.num_copies += 1

    def stream(self, request_id: int, num_tokens: int) -> tuple[object, ...]:
        spec = self.scheduler.requests[request_id].spec
        tokens = [(c, i) for c, n in spec.content() for i in range(n)]
        return tuple(tokens[:num_tokens])

    def run(self, plan: StepPlan) -> None:
        """The step computes its chunks: each slot moves on to its chunk's end."""
        for chunk in plan.chunks:
            slot = self.scheduler.allocator.units(chunk.request_id).slot
            self.slots[slot] = self.stream(chunk.request_id, chunk.context_tokens)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", ["avmp", "vllm-align", "sglang"])
def test_a_hit_resumes_from_the_state_of_exactly_its_prefix(layout: str, policy: str) -> None:
    """With a copier standing in for the engine's slot copies: every hit's slot holds,
    before its first chunk, the state of exactly the tokens it skips, and every
    checkpoint the state at its node's end."""
    scheduler = _scheduler(layout, policy)
    states = _States(scheduler)
    scheduler = Scheduler(scheduler.allocator, scheduler.config, slot_copier=states.copy)
    states.scheduler = scheduler
    specs = _turns(3) + [RequestSpec(10 + i, 0.0, 700, 40, (("system", 600), (("q", i), 100)))
                         for i in range(3)]  # fmt: skip
    prefix = scheduler.prefix
    assert prefix is not None
    num_hits = 0
    for spec in specs:
        scheduler.add_request(spec)
        while scheduler.has_unfinished:
            plan = scheduler.schedule()
            for copy in plan.restored:  # the state the first chunk starts from
                slot = scheduler.allocator.units(copy.request_id).slot
                start = next(c.start for c in plan.chunks if c.request_id == copy.request_id)
                assert states.slots[slot] == states.stream(copy.request_id, start)
                num_hits += 1
            states.run(plan)
            outcome = scheduler.finish_step(plan)
            for taken in outcome.checkpointed:
                checkpoint = scheduler.allocator.cached_unit(taken.key)
                held = states.slots[checkpoint]
                assert len(held) % prefix.tree.unit_tokens == 0
                assert held == states.stream(taken.request_id, len(held))
            scheduler.check_integrity()
    assert num_hits >= 2 and states.num_copies >= num_hits
