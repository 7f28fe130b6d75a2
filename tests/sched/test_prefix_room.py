"""The prefix cache's room rule: on AVMP's pools, an allocation that would migrate chunks
while the short pool holds cached units evicts them first unless the cache's recent reuse
pays for the move (`avmp.sched.prefix.ReuseLedger`)."""

from __future__ import annotations

import dataclasses

import pytest

from avmp.memory.registry import make_allocator
from avmp.memory.spec import CacheAllocator, MemoryConfig, PoolKind
from avmp.models.geometry import ModelGeometry
from avmp.sched.prefix import (
    PrefixCache,
    PrefixCacheConfig,
    ReuseLedger,
    prefill_flops,
    room_shortfall,
)
from avmp.sched.request import RequestSpec
from avmp.sched.scheduler import Scheduler, SchedulerConfig
from sched_helpers import MIB, tiny_geometry


def _geometry() -> ModelGeometry:
    """The tiny hybrid's caches with an 8B model's FLOPs per token, so that a hit saves
    what it saves on a real model (the tiny one's 100M parameters make a hit of a few
    hundred tokens worth about one chunk's migration)."""
    return dataclasses.replace(tiny_geometry(), num_params=8_000_000_000,
                               num_active_params=8_000_000_000)  # fmt: skip


def _scheduler(room: str, budget_mib: int = 32, half_life: int = 256) -> Scheduler:
    allocator = make_allocator("avmp", _geometry(), MemoryConfig(budget_mib * MIB))
    prefix = PrefixCacheConfig("avmp", room=room, reuse_half_life=half_life)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, prefix_cache=prefix)
    return Scheduler(allocator, config)


def _cache(scheduler: Scheduler) -> PrefixCache:
    assert scheduler.prefix is not None
    return scheduler.prefix


def _unique(first_id: int, num: int) -> list[RequestSpec]:
    """Requests that share nothing (ShareGPT first turns): prompts and outputs of
    varied lengths, content of their own."""
    return [
        RequestSpec(first_id + i, 0.0, 200 + 37 * (i % 9), 40 + 11 * (i % 5),
                    ((("prompt", first_id + i), 200 + 37 * (i % 9)),),
                    ("answer", first_id + i))
        for i in range(num)
    ]  # fmt: skip


def _conversation_turns(first_id: int, num_conversations: int, num_turns: int
                        ) -> list[list[RequestSpec]]:  # fmt: skip
    """Rounds of turns: round t holds turn t of every conversation, each prompt the
    whole history so far (so every turn after the first hits the last one's output)."""
    histories: list[list[tuple[object, int]]] = [
        [(("system", c), 300)] for c in range(num_conversations)
    ]
    rounds, next_id = [], first_id
    for turn in range(num_turns):
        specs = []
        for c, history in enumerate(histories):
            history.append((("user", c, turn), 30))
            output = ("answer", c, turn)
            prompt = sum(n for _, n in history)
            specs.append(RequestSpec(next_id, 0.0, prompt, 40, tuple(history), output))
            history.append((output, 40))
            next_id += 1
        rounds.append(specs)
    return rounds


def _serve(scheduler: Scheduler, specs: list[RequestSpec]) -> None:
    for spec in specs:
        scheduler.add_request(spec)
    while scheduler.has_unfinished:
        scheduler.finish_step(scheduler.schedule())
        scheduler.check_integrity()


def test_without_reuse_cached_units_yield_before_capacity_moves() -> None:
    """Nothing is ever hit: every migration the cache's hold calls for is declined and
    its units evicted instead; capacity moves less than when migrating first."""
    runs = {}
    for room in ("reuse", "migrate"):
        scheduler = _scheduler(room)
        _serve(scheduler, _unique(0, 60))
        runs[room] = scheduler
    stats = _cache(runs["reuse"]).stats
    assert stats.num_hit_tokens == 0
    assert stats.num_moves_declined > 0 and stats.num_units_yielded > 0
    assert stats.num_moves_paid == 0
    assert _cache(runs["migrate"]).stats.num_moves_declined == 0
    moved = {room: s.allocator.stats.num_chunks_migrated for room, s in runs.items()}
    assert moved["reuse"] < moved["migrate"], moved


def test_with_reuse_capacity_moves_first_as_before() -> None:
    """Every turn after the first hits: once hits have been seen the cache keeps its
    units and lets capacity move, and it hits more than when it always evicts first."""
    runs = {}
    for room in ("reuse", "evict"):
        scheduler = _scheduler(room)
        for specs in _conversation_turns(0, 16, 6):
            _serve(scheduler, specs)
        runs[room] = scheduler
    stats = _cache(runs["reuse"]).stats
    assert stats.num_hit_tokens > 0
    assert stats.num_moves_paid > 0
    assert stats.num_hit_tokens > _cache(runs["evict"]).stats.num_hit_tokens
    assert _cache(runs["evict"]).stats.num_moves_paid == 0


def test_the_rule_follows_observed_reuse() -> None:
    """Conversations (reuse: moves paid), then unique requests long enough for the hits
    to fade (moves declined), then conversations again (paid again)."""
    scheduler = _scheduler("reuse", half_life=16)
    stats = _cache(scheduler).stats

    def phase(rounds: list[list[RequestSpec]]) -> tuple[int, int]:
        paid, declined = stats.num_moves_paid, stats.num_moves_declined
        for specs in rounds:
            _serve(scheduler, specs)
        return stats.num_moves_paid - paid, stats.num_moves_declined - declined

    first_paid, _ = phase(_conversation_turns(0, 16, 6))
    assert first_paid > 0
    faded = [phase([_unique(1000 + 40 * i, 40)]) for i in range(6)]
    assert faded[0][0] > 0  # what the conversations saved still pays at first
    late_paid, late_declined = faded[-1]  # 200 admissions later (12 half-lives)
    assert late_paid == 0 and late_declined > 0, faded
    again_paid, _ = phase(_conversation_turns(5000, 16, 6))
    assert again_paid > 0


def test_ledger_pays_while_savings_exceed_the_moves() -> None:
    config = PrefixCacheConfig("avmp", reuse_half_life=4)
    ledger = ReuseLedger(config)
    move_s = config.migration_s_per_chunk
    assert not ledger.pays_for(move_s)  # nothing saved yet
    ledger.admitted(prefill_flops(tiny_geometry(), 4096))
    assert ledger.pays_for(move_s)
    for _ in range(64):  # misses only: what was saved decays away
        ledger.admitted(0.0)
    assert not ledger.pays_for(move_s)


def _fill_state_pool(allocator: CacheAllocator) -> None:
    """Give the KV pool free chunks (a long request, freed), then admit short requests
    until the reserve is gone and the state pool is full."""
    assert allocator.admit(0, 4096) is not None
    allocator.free(0)
    request_id = 1
    while room_shortfall(allocator, 0, 1) is None:
        assert allocator.admit(request_id, 16) is not None
        request_id += 1


def test_room_shortfall_reads_what_the_allocator_would_do() -> None:
    allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(32 * MIB))
    assert room_shortfall(allocator, 1, 1) is None  # the reserve covers it
    _fill_state_pool(allocator)
    short = room_shortfall(allocator, 0, 1)
    assert short is not None and short.pool is PoolKind.STATE and short.migrates
    before = allocator.stats.num_chunks_migrated
    assert allocator.cache_checkpoint() is not None
    assert allocator.stats.num_chunks_migrated - before >= short.num_chunks >= 1


def test_two_short_pools_beyond_the_reserve_are_a_failure_not_a_migration() -> None:
    allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(32 * MIB))
    _fill_state_pool(allocator)
    free_pages = allocator.num_free_units(PoolKind.KV)  # type: ignore[attr-defined]
    short = room_shortfall(allocator, free_pages + 64, 1)
    assert short is not None and not short.migrates and short.pool is PoolKind.KV
    failed = allocator.stats.num_oom_events
    assert allocator.admit(999, 16 * (free_pages + 64)) is None
    assert allocator.stats.num_oom_events == failed + 1


@pytest.mark.parametrize("layout", ["static", "unified", "oracle"])
def test_layouts_whose_pools_never_move_migrate_nothing(layout: str) -> None:
    allocator = make_allocator(layout, tiny_geometry(), MemoryConfig(24 * MIB))
    assert room_shortfall(allocator, 10_000, 10_000) is None


def test_room_rule_defaults_and_bad_values() -> None:
    assert PrefixCacheConfig("avmp").room == "reuse"
    assert PrefixCacheConfig("sglang", "lru").room == "migrate"  # the peers move nothing
    assert PrefixCacheConfig("vllm-align", align_tokens=64).room == "migrate"
    with pytest.raises(ValueError, match="room rule"):
        PrefixCacheConfig("avmp", room="sometimes")
    with pytest.raises(ValueError, match="migration_s_per_chunk"):
        PrefixCacheConfig("avmp", migration_s_per_chunk=0.0)
    with pytest.raises(ValueError, match="reuse_half_life"):
        PrefixCacheConfig("avmp", reuse_half_life=0)
