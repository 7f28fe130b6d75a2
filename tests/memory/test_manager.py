"""The AVMP manager on hand-built geometries whose every decision is worked out by hand.

Geometry: one attention layer of 8 KV heads x 128 (4 KiB per token, so a 256-token page
is 1 MiB: two pages per 2 MiB chunk) and one recurrent layer whose fp32 state is 3 MiB
(a slot straddles chunks) or 1 MiB (two slots per chunk).
"""

from __future__ import annotations

import pytest

from avmp.memory import AvmpManager
from avmp.memory.backing import BackingError, HostBacking
from avmp.memory.migration import MemoryEvent
from avmp.memory.spec import (
    DoubleFreeError,
    DuplicateRequestError,
    MemoryConfig,
    PoolKind,
    RequestTooLargeError,
    RequestUnits,
    UnknownRequestError,
)
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)

MiB = 1 << 20
KV, STATE = PoolKind.KV, PoolKind.STATE
PAGE = 256  # tokens per page in these tests


def geometry(slot_mib: int = 3, attention: bool = True, state: bool = True) -> ModelGeometry:
    channels = slot_mib * MiB // (128 * 4)
    recurrent = RecurrentLayer(1, LayerKind.MAMBA2, ssm=CacheTensor("ssm", (channels, 128),
                                                                       "float32"))
    return ModelGeometry(
        name="hand-built", family="test", num_layers=2,
        attention_layers=(AttentionLayer(0, 8, 128),) if attention else (),
        recurrent_layers=(recurrent,) if state else (),
        hidden_size=64, vocab_size=256, num_params=1, num_active_params=1,
    )


def manager(num_chunks: int, slot_mib: int = 3, batch: int = 0,
            backing: HostBacking | None = None) -> AvmpManager:
    config = MemoryConfig(budget_bytes=num_chunks * 2 * MiB, block_size=PAGE,
                          migration_batch_chunks=batch)
    return AvmpManager(geometry(slot_mib), config, backing)


def fill(backing: HostBacking, pool: PoolKind, index: int, value: int, num_bytes: int) -> bytes:
    data = bytes([value]) * num_bytes
    backing.write_unit(pool, index, data)
    return data


def test_first_admit_takes_the_fewest_reserve_chunks() -> None:
    m = manager(6)
    assert m.admit(1, PAGE) == RequestUnits(slot=0, pages=(0,))
    assert m.pool_chunks(STATE) == [0, 1]  # a 3 MiB slot needs two chunks
    assert m.pool_chunks(KV) == [2]
    assert m.reserve_chunks() == [3, 4, 5]
    assert m.events == [MemoryEvent("reserve", STATE, 2, 0, 4 * MiB),
                        MemoryEvent("reserve", KV, 1, 0, 2 * MiB)]
    assert (m.num_units(KV), m.num_free_units(KV)) == (2, 1)
    assert (m.num_units(STATE), m.num_free_units(STATE)) == (1, 0)
    assert m.stats.num_migrations == 0
    m.check_integrity()


def test_batch_chunks_come_on_top_of_the_demand() -> None:
    m = manager(6, batch=1)
    m.admit(1, PAGE)
    assert m.pool_chunks(STATE) == [0, 1, 2]
    assert m.pool_chunks(KV) == [3, 4]
    assert m.reserve_chunks() == [5]


def test_migration_of_a_free_tail_chunk() -> None:
    m = manager(6)
    m.admit(1, 8 * PAGE)  # 8 pages: 4 chunks; the slot: 2 chunks; reserve now empty
    m.free(1)
    m.admit(2, PAGE)  # page 0, slot 0: no capacity change
    assert len(m.events) == 2
    blocks = m.admit(3, PAGE)  # a second slot needs 6 MiB: one chunk from the KV tail
    assert blocks == RequestUnits(slot=1, pages=(1,))
    assert m.pool_chunks(KV) == [2, 3, 4]
    assert m.pool_chunks(STATE) == [0, 1, 5]
    assert m.events[-1] == MemoryEvent("migration", STATE, 1, 0, 2 * MiB)
    assert m.stats.num_migrations == 1 and m.stats.num_chunks_migrated == 1
    assert m.stats.chunks_migrated_to == {"kv": 0, "state": 1}
    assert m.placement_epoch == 0 and m.stats.num_compactions == 0
    m.check_integrity()


def test_migration_batch_is_bounded_by_free_tail_chunks() -> None:
    m = manager(6, batch=5)
    m.admit(1, 8 * PAGE)  # both pools short: state 2 chunks, KV 4, no spare for a batch
    m.free(1)
    m.admit(2, PAGE)
    m.admit(3, PAGE)  # state short 1; KV's free tail is 3 chunks: 1 + batch, capped at 3
    assert m.pool_chunks(KV) == [2]
    assert m.pool_chunks(STATE) == [0, 1, 5, 4, 3]  # the chunk at the boundary comes first
    assert m.stats.num_chunks_migrated == 3
    m.check_integrity()


def test_compaction_of_the_state_tail_keeps_handles_and_bytes() -> None:
    with HostBacking() as backing:
        m = manager(8, backing=backing)
        m.admit(1, PAGE)  # state [0, 1], KV [2]
        m.admit(2, PAGE)  # state takes chunk 3 for a second slot
        m.admit(3, PAGE)  # both short: state [4, 5], KV [6]; reserve [7]
        assert m.pool_chunks(STATE) == [0, 1, 3, 4, 5] and m.pool_chunks(KV) == [2, 6]
        slot_bytes = fill(backing, STATE, m.units(3).slot, 0xA3, 3 * MiB)
        page_bytes = fill(backing, KV, m.units(3).pages[0], 0xB3, MiB)
        m.free(1)  # slot 0 and page 0 free; request 3's slot 2 still straddles the tail
        new_pages = m.grow(3, 5 * PAGE)  # 5 more pages: 7 in all need 4 KV chunks
        assert new_pages == [0, 3, 4, 5, 6]
        assert m.units(3) == RequestUnits(slot=0, pages=(2, 0, 3, 4, 5, 6))
        assert m.pool_chunks(KV) == [2, 6, 7, 5]
        assert m.pool_chunks(STATE) == [0, 1, 3, 4]
        assert m.events[-3:] == [
            MemoryEvent("reserve", KV, 1, 0, 2 * MiB),
            MemoryEvent("compaction", STATE, 0, 1, 3 * MiB),
            MemoryEvent("migration", KV, 1, 0, 2 * MiB),
        ]
        assert m.placement_epoch == 1
        assert (m.stats.num_compactions, m.stats.num_units_moved) == (1, 1)
        assert m.stats.num_bytes_compacted == 3 * MiB
        assert backing.read_unit(STATE, 0) == slot_bytes
        assert backing.read_unit(KV, 2) == page_bytes
        assert backing.mapped_chunks(KV) == m.pool_chunks(KV)
        m.check_integrity()


def test_compaction_of_the_kv_tail_rewrites_page_tables() -> None:
    with HostBacking() as backing:
        m = manager(4, slot_mib=1, backing=backing)
        m.admit(1, 4 * PAGE)  # state [0] (two 1 MiB slots), KV [1, 2]
        m.admit(2, PAGE)  # page 4: KV takes chunk 3; the reserve is empty
        page_bytes = fill(backing, KV, 4, 0xC2, MiB)
        m.free(1)
        m.admit(3, PAGE)  # slot 0, page 0
        blocks = m.admit(4, PAGE)  # a third slot: the KV tail holds page 4, so compact
        assert blocks == RequestUnits(slot=2, pages=(2,))
        assert m.units(2).pages == (1,)
        assert m.pool_chunks(STATE) == [0, 3]
        assert backing.read_unit(KV, 1) == page_bytes
        assert [e.kind for e in m.events[-2:]] == ["compaction", "migration"]
        m.check_integrity()


def test_out_of_memory_is_none_and_changes_nothing() -> None:
    m = manager(8)
    for request_id in (1, 2, 3):
        m.admit(request_id, PAGE)
    before = (m.pool_chunks(KV), m.pool_chunks(STATE), m.reserve_chunks(), m.usage(),
              len(m.events), [m.units(r) for r in m.request_ids])
    assert m.admit(4, 8 * PAGE) is None  # needs 4 + 1 chunks, one is left
    assert m.grow(3, 8 * PAGE) is None
    after = (m.pool_chunks(KV), m.pool_chunks(STATE), m.reserve_chunks(), m.usage(),
             len(m.events), [m.units(r) for r in m.request_ids])
    assert after == before
    assert m.stats.num_oom_events == 2
    assert m.request_ids == [1, 2, 3] and m.num_tokens(3) == PAGE
    m.check_integrity()


def test_fits_alone_counts_both_pools_in_whole_chunks() -> None:
    m = manager(4)  # a 3 MiB slot takes 2 chunks; 2 chunks hold 4 pages
    assert m.fits_alone(4 * PAGE)
    assert not m.fits_alone(4 * PAGE + 1)
    assert m.admit(1, 4 * PAGE) is not None
    with pytest.raises(RequestTooLargeError):
        m.grow(1, 1)
    with pytest.raises(RequestTooLargeError):
        m.admit(2, 4 * PAGE + 1)
    assert manager(1).fits_alone(1) is False  # the slot alone needs two chunks


def test_misuse_raises() -> None:
    m = manager(8)
    m.admit(1, 10)
    with pytest.raises(DuplicateRequestError):
        m.admit(1, 10)
    with pytest.raises(ValueError):
        m.admit(2, 0)
    with pytest.raises(ValueError):
        m.grow(1, 0)
    for call in (lambda: m.grow(9, 1), lambda: m.units(9), lambda: m.num_tokens(9),
                 lambda: m.free(9)):
        with pytest.raises(UnknownRequestError):
            call()
    m.free(1)
    with pytest.raises(DoubleFreeError):
        m.free(1)
    with pytest.raises(UnknownRequestError):
        m.grow(1, 1)
    assert m.admit(1, 10) is not None  # a freed id may come back
    m.check_integrity()


def test_grow_adds_pages_only_at_page_boundaries() -> None:
    m = manager(8)
    m.admit(1, PAGE - 2)
    assert m.grow(1, 2) == []
    assert m.grow(1, 1) == [1]
    assert m.num_tokens(1) == PAGE + 1
    assert m.units(1).pages == (0, 1)


def test_usage_reports_capacity_use_and_need() -> None:
    m = manager(8)
    m.admit(1, 300)
    m.admit(2, 10)
    usage = m.usage()
    assert usage.kv_capacity_bytes == 4 * MiB and usage.state_capacity_bytes == 6 * MiB
    assert usage.kv_used_bytes == 3 * MiB and usage.kv_needed_bytes == 310 * 4096
    assert usage.state_used_bytes == usage.state_needed_bytes == 6 * MiB
    assert (usage.num_requests, usage.num_pages_used, usage.num_slots_used) == (2, 3, 2)
    assert usage.unassigned_bytes == 6 * MiB


def test_model_without_attention_holds_no_pages() -> None:
    config = MemoryConfig(budget_bytes=4 * MiB, block_size=PAGE)
    m = AvmpManager(geometry(attention=False), config)
    assert m.admit(1, 10**6) == RequestUnits(slot=0, pages=())
    assert m.grow(1, 10**6) == []
    assert m.pool_chunks(KV) == [] and m.num_units(KV) == 0
    assert m.usage().kv_needed_bytes == 0
    m.check_integrity()


def test_model_without_state_gets_no_slot() -> None:
    config = MemoryConfig(budget_bytes=2 * MiB, block_size=PAGE)
    m = AvmpManager(geometry(state=False), config)
    assert m.admit(1, PAGE) == RequestUnits(slot=-1, pages=(0,))
    assert m.admit(2, PAGE) == RequestUnits(slot=-1, pages=(1,))
    assert m.admit(3, 1) is None
    m.free(1)
    assert m.pool_chunks(STATE) == []
    m.check_integrity()


def test_debug_env_checks_after_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVMP_DEBUG", "1")
    m = manager(8)
    m.admit(1, PAGE)
    m._kv.num_free += 1  # corrupt the bookkeeping: the next call must notice
    with pytest.raises(AssertionError, match="free count"):
        m.admit(2, PAGE)
    monkeypatch.setenv("AVMP_DEBUG", "0")
    quiet = manager(8)
    quiet.admit(1, PAGE)
    quiet._kv.num_free += 1
    quiet.admit(2, PAGE)  # no check without AVMP_DEBUG=1


def test_registry_builds_the_manager() -> None:
    from avmp.memory.registry import make_allocator

    allocator = make_allocator("avmp", geometry(), MemoryConfig(budget_bytes=8 * MiB))
    assert isinstance(allocator, AvmpManager) and allocator.name == "avmp"


class FailingMapBacking(HostBacking):
    """A host backing whose ``fail_on``-th map call raises (a driver error)."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.num_maps = 0
        self.fail_on = fail_on

    def map_chunks(self, pool: PoolKind, chunk_ids: list[int]) -> None:
        self.num_maps += 1
        if self.num_maps == self.fail_on:
            raise BackingError("injected map failure")
        super().map_chunks(pool, chunk_ids)


def test_a_failed_reserve_mapping_returns_the_chunks() -> None:
    backing = FailingMapBacking(fail_on=2)  # the KV mapping of the first admit
    m = manager(6, backing=backing)
    with pytest.raises(BackingError):
        m.admit(1, PAGE)
    assert m.pool_chunks(STATE) == [0, 1] and m.pool_chunks(KV) == []
    assert m.reserve_chunks() == [2, 3, 4, 5]
    assert m.request_ids == []
    m.check_integrity()
    assert m.admit(1, PAGE) == RequestUnits(slot=0, pages=(0,))
    assert backing.mapped_chunks(KV) == m.pool_chunks(KV) == [2]


def test_a_failed_migration_mapping_leaves_the_chunks_with_the_donor() -> None:
    backing = FailingMapBacking(fail_on=3)  # state, KV, then the migration's mapping
    m = manager(6, backing=backing)
    m.admit(1, 8 * PAGE)
    m.free(1)
    m.admit(2, PAGE)
    with pytest.raises(BackingError):
        m.admit(3, PAGE)
    assert m.pool_chunks(KV) == backing.mapped_chunks(KV) == [2, 3, 4, 5]
    assert m.pool_chunks(STATE) == backing.mapped_chunks(STATE) == [0, 1]
    assert m.request_ids == [2]
    m.check_integrity()


def test_a_huge_budget_costs_nothing_until_used() -> None:
    """100 TiB is 52 million chunks: the reserve is a range, so building the manager and
    admitting a request take no time and no memory proportional to the budget."""
    import time
    import tracemalloc

    tracemalloc.start()
    started = time.perf_counter()
    m = AvmpManager(geometry(), MemoryConfig(budget_bytes=100 << 40))
    assert m.admit(0, 100) is not None and m.grow(0, 1000) is not None
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert m.config.num_chunks == 100 << 19
    assert m.usage().unassigned_bytes >= (100 << 40) - (16 << 20)  # nearly all in the reserve
    assert peak < 1 << 20 and elapsed < 1.0
