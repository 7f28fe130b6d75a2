"""The prefix cache's second level: checkpoints evicted from the device kept in the host
tier (`avmp.sched.prefix.HostLevel`), restored on a later hit instead of recomputed."""

from __future__ import annotations

import dataclasses

import pytest

from avmp.memory.backing.host import HostBacking
from avmp.memory.host_tier import HostExtent
from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig, PoolKind
from avmp.models.geometry import ModelGeometry
from avmp.sched.prefix import PrefixCache, PrefixCacheConfig
from avmp.sched.request import RequestSpec
from avmp.sched.scheduler import Scheduler, SchedulerConfig, StepPlan
from sched_helpers import MIB, tiny_geometry


def _geometry() -> ModelGeometry:
    """The tiny hybrid's caches (a 512 KiB slot, 32 KiB pages) with an 8B model's FLOPs,
    so that a hit saves what it saves on a real model and restoring a checkpoint pays."""
    return dataclasses.replace(tiny_geometry(), num_params=8_000_000_000,
                               num_active_params=8_000_000_000)  # fmt: skip


def _rounds(num_conversations: int, num_turns: int) -> list[list[RequestSpec]]:
    """Round t holds turn t of every conversation; each prompt is its whole history, so
    a turn hits where the conversation's last turn ended, if that checkpoint is left."""
    histories: list[list[tuple[object, int]]] = [
        [(("system", c), 64)] for c in range(num_conversations)
    ]
    rounds, next_id = [], 0
    for turn in range(num_turns):
        specs = []
        for c, history in enumerate(histories):
            history.append((("user", c, turn), 16))
            output = ("answer", c, turn)
            prompt = sum(n for _, n in history)
            specs.append(RequestSpec(next_id, 0.0, prompt, 16, tuple(history), output))
            history.append((output, 16))
            next_id += 1
        rounds.append(specs)
    return rounds


class _Memory:
    """What each slot and each host extent holds, as the engine's would: a request's
    stream up to its computed tokens after every step, moved by the cache's copies."""

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.slots: dict[int, tuple[object, ...]] = {}
        self.host: dict[int, tuple[object, ...]] = {}

    def copy(self, src: int, dst: int) -> None:
        self.slots[dst] = self.slots[src]

    def to_host(self, slot: int, extent: HostExtent) -> None:
        self.host[extent.offset] = self.slots[slot]

    def from_host(self, extent: HostExtent, slot: int) -> None:
        self.slots[slot] = self.host[extent.offset]

    def stream(self, request_id: int, num_tokens: int) -> tuple[object, ...]:
        assert self.scheduler is not None
        spec = self.scheduler.requests[request_id].spec
        tokens = [(c, i) for c, n in spec.content() for i in range(n)]
        return tuple(tokens[:num_tokens])

    def run(self, plan: StepPlan) -> None:
        assert self.scheduler is not None
        for chunk in plan.chunks:
            slot = self.scheduler.allocator.units(chunk.request_id).slot
            self.slots[slot] = self.stream(chunk.request_id, chunk.context_tokens)


class _Compacting(HostBacking):
    """A host backing whose compactions also move what `_Memory` says a slot holds."""

    def __init__(self, memory: _Memory) -> None:
        super().__init__()
        self.memory = memory

    def copy_units(self, pool: PoolKind, moves: list[tuple[int, int]]) -> None:
        super().copy_units(pool, moves)
        if pool is PoolKind.STATE:
            slots = self.memory.slots
            held = [slots.get(src) for src, _ in moves]
            for (_, dst), state in zip(moves, held, strict=True):
                if state is not None:
                    slots[dst] = state


def _scheduler(host_level: bool, budget_mib: int = 8, host_mib: int = 64, layout: str = "avmp",
               memory: _Memory | None = None, **config: float) -> Scheduler:  # fmt: skip
    backing = None if memory is None else _Compacting(memory)
    allocator = make_allocator(layout, _geometry(), MemoryConfig(budget_mib * MIB), backing)
    prefix = PrefixCacheConfig("avmp", host_level=host_level, **config)  # type: ignore[arg-type]
    scheduler_config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=256, host_tier_bytes=host_mib * MIB,
        prefix_cache=prefix,
    )  # fmt: skip
    copier = None if memory is None else memory.copy
    scheduler = Scheduler(allocator, scheduler_config, slot_copier=copier)
    assert scheduler.prefix is not None
    scheduler.prefix.use_host_tier(scheduler.host_tier, memory)
    if memory is not None:
        memory.scheduler = scheduler
    return scheduler


def _cache(scheduler: Scheduler) -> PrefixCache:
    assert scheduler.prefix is not None
    return scheduler.prefix


def _serve(scheduler: Scheduler, rounds: list[list[RequestSpec]],
           memory: _Memory | None = None) -> int:  # fmt: skip
    """Run every round to its end; returns the hits restored from the host tier, each
    checked (with ``memory``) to start from the state of exactly the tokens it skips."""
    from_host = 0
    for specs in rounds:
        for spec in specs:
            scheduler.add_request(spec)
        while scheduler.has_unfinished:
            plan = scheduler.schedule()
            for copy in plan.restored:
                from_host += copy.from_host
                if memory is not None:
                    slot = scheduler.allocator.units(copy.request_id).slot
                    start = next(c.start for c in plan.chunks if c.request_id == copy.request_id)
                    assert memory.slots[slot] == memory.stream(copy.request_id, start)
            if memory is not None:
                memory.run(plan)
            scheduler.finish_step(plan)
            scheduler.check_integrity()
    return from_host


@pytest.mark.parametrize("layout", ["avmp", "static"])
def test_evicted_checkpoints_are_restored_from_the_host_tier(layout: str) -> None:
    """Eight conversations whose checkpoints do not all fit on the device: with the
    second level, once a turn has missed a checkpoint the level declined (its ghost),
    the turns whose checkpoint was evicted resume from its host copy (exactly the state
    of the tokens they skip) and hit more than without it."""
    rounds = _rounds(8, 5)
    without = _scheduler(host_level=False, layout=layout)
    assert _serve(without, rounds) == 0
    memory = _Memory()
    with_host = _scheduler(host_level=True, memory=memory, layout=layout)
    from_host = _serve(with_host, rounds, memory)
    host = _cache(with_host).tree.host
    assert host is not None
    assert from_host == host.stats.num_restored > 0
    assert host.stats.num_kept > 0
    checkpoint_bytes = _cache(with_host).tree.checkpoint_bytes
    assert host.stats.num_bytes_in == host.stats.num_restored * checkpoint_bytes
    assert _cache(without).tree.num_evicted_checkpoints > 0  # the device level did run out
    hits = {name: _cache(s).stats.num_hit_tokens for name, s in
            (("without", without), ("with", with_host))}  # fmt: skip
    assert hits["with"] > hits["without"], hits


def test_a_checkpoint_not_worth_its_copy_stays_off_the_host() -> None:
    """A host link so slow that restoring costs more than recomputing: nothing is kept,
    and the run is the run without the second level."""
    rounds = _rounds(12, 4)
    slow = _scheduler(host_level=True, host_bytes_per_s=1e3)
    _serve(slow, rounds)
    host = _cache(slow).tree.host
    assert host is not None and host.stats.num_kept == 0 and host.stats.num_refused > 0
    without = _scheduler(host_level=False)
    _serve(without, rounds)
    assert _cache(slow).stats == _cache(without).stats


def test_a_full_tier_keeps_the_more_valuable_checkpoints() -> None:
    """A tier of two checkpoints: newcomers displace only host checkpoints ranked below
    them, and the tier never holds more than it can."""
    scheduler = _scheduler(host_level=True, host_mib=1)
    _serve(scheduler, _rounds(12, 5))
    host = _cache(scheduler).tree.host
    assert host is not None
    assert host.stats.peak_checkpoints <= 2
    assert host.stats.num_kept > 2 and host.stats.num_dropped > 0
    assert scheduler.host_tier.cached_bytes <= MIB


def test_swapped_out_requests_come_before_host_checkpoints() -> None:
    """The tier drops cached checkpoints for a request's extent, and the tree forgets
    them (its integrity holds; a later hit recomputes)."""
    scheduler = _scheduler(host_level=True)
    _serve(scheduler, _rounds(12, 4))
    host = _cache(scheduler).tree.host
    assert host is not None and host.nodes
    tier = scheduler.host_tier
    held = len(host.nodes)
    extent = tier.reserve(10_000, tier.capacity_bytes)  # all of it: every checkpoint goes
    assert extent is not None and not host.nodes and tier.cached_keys == []
    assert host.stats.num_dropped >= held
    _cache(scheduler).tree.check_integrity()
    tier.release(10_000)


def test_off_by_default_and_without_state() -> None:
    """No host level unless the config asks, nor for a model without recurrent state."""
    scheduler = _scheduler(host_level=False)
    assert not _cache(scheduler).use_host_tier(scheduler.host_tier)
    attention_only = dataclasses.replace(_geometry(), recurrent_layers=())
    allocator = make_allocator("avmp", attention_only, MemoryConfig(8 * MIB))
    config = SchedulerConfig(host_tier_bytes=MIB, prefix_cache=PrefixCacheConfig(host_level=True))
    plain = Scheduler(allocator, config)
    assert plain.prefix is not None and not plain.prefix.use_host_tier(plain.host_tier)


def test_without_reuse_the_level_copies_nothing() -> None:
    """Single turns that share nothing: the checkpoints the device evicts are declined
    (the level starts with no credit and no request ever misses one), so nothing is
    copied out and the run is the run without the second level."""
    rounds = [[spec for specs in _rounds(24, 1) for spec in specs]]
    with_host = _scheduler(host_level=True)
    _serve(with_host, rounds)
    host = _cache(with_host).tree.host
    assert host is not None
    assert host.stats.num_declined > 0  # the device did evict checkpoints worth a copy
    assert host.stats.num_kept == host.stats.num_missed == host.stats.num_bytes_out == 0
    without = _scheduler(host_level=False)
    _serve(without, rounds)
    assert _cache(with_host).stats == _cache(without).stats


def test_a_missed_ghost_lets_the_level_copy() -> None:
    """The level declines the device's first evictions (no credit); a later turn that
    would have resumed from one of them (its ghost) credits it, and only then does it
    keep checkpoints: no copy precedes the first miss."""
    scheduler = _scheduler(host_level=True)
    host = _cache(scheduler).tree.host
    assert host is not None
    kept_before_a_miss = 0
    for specs in _rounds(8, 4):
        for spec in specs:
            scheduler.add_request(spec)
        while scheduler.has_unfinished:
            plan = scheduler.schedule()
            scheduler.finish_step(plan)
            if not host.stats.num_missed:
                kept_before_a_miss = host.stats.num_kept
    assert kept_before_a_miss == 0
    assert host.stats.num_declined > 0 and host.stats.num_missed > 0
    assert host.stats.num_kept > 0 and host.stats.num_restored > 0
