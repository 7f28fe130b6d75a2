"""The baselines placed in memory: SGLang's fixed split on the AVMP manager, and vLLM's
unified pool with a byte position for every block."""

from __future__ import annotations

import pytest
from hybrid_geometries import jamba_mini, small_hybrid
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory.backing.host import HostBacking
from avmp.memory.baselines import StaticAllocator, UnifiedAllocator
from avmp.memory.placed import PlacedUnifiedAllocator, StaticSplitManager
from avmp.memory.spec import MemoryConfig, PoolKind, RequestTooLargeError

MiB = 1 << 20


# ------------------------------------------------------------------------------ static


def test_static_split_never_migrates_and_refuses_when_its_pool_is_full() -> None:
    geometry = small_hybrid(2, 6, d_inner=512)
    config = MemoryConfig(8 * MiB)
    manager = StaticSplitManager(geometry, config, HostBacking(), state_fraction=0.25)
    assert len(manager.pool_chunks(PoolKind.STATE)) == 1  # 25% of 4 chunks
    assert len(manager.pool_chunks(PoolKind.KV)) == 3 and manager.reserve_chunks() == []
    slots = manager.num_units(PoolKind.STATE)
    for request_id in range(slots):
        assert manager.admit(request_id, 1) is not None
    assert manager.num_free_units(PoolKind.KV) > 0
    assert manager.admit(slots, 1) is None  # KV is free, but the state pool is full
    assert manager.stats.num_oom_events == 1
    assert manager.stats.num_migrations == 0 and manager.events == []
    manager.check_integrity()


def test_static_split_matches_the_bookkeeping_baseline_within_a_unit_per_pool() -> None:
    geometry = jamba_mini()
    config = MemoryConfig(4096 * MiB)
    placed = StaticSplitManager(geometry, config)
    counted = StaticAllocator(geometry, config)
    assert placed.state_fraction == counted.state_fraction
    assert counted.num_slots - 1 <= placed.num_units(PoolKind.STATE) <= counted.num_slots
    assert counted.num_pages - 1 <= placed.num_units(PoolKind.KV) <= counted.num_pages + 1


def test_static_split_too_small_for_one_slot_rejects_everything() -> None:
    geometry = small_hybrid(2, 6, d_inner=512)
    manager = StaticSplitManager(geometry, MemoryConfig(4 * MiB), state_fraction=0.01)
    assert manager.num_units(PoolKind.STATE) == 0
    assert not manager.fits_alone(1)
    with pytest.raises(RequestTooLargeError):
        manager.admit(0, 1)


# ----------------------------------------------------------------------------- unified


def test_unified_blocks_are_whole_kernel_pages_and_state_runs() -> None:
    """Jamba-1.5-Mini: 80-token blocks of four attention layers = 5 kernel pages of 16
    tokens; a request's state (28 Mamba layers) spans 7 blocks."""
    geometry = jamba_mini()
    allocator = PlacedUnifiedAllocator(geometry, MemoryConfig(1024 * MiB))
    assert allocator.vllm.block_size == 80 and allocator.vllm.num_state_groups == 7
    fmt = allocator.cache_format()
    assert fmt.page.unit_bytes * 5 == allocator.vllm.block_bytes == allocator.spec.page_bytes * 5
    assert fmt.slot.unit_bytes == 7 * allocator.vllm.block_bytes >= fmt.slot.exact_bytes
    blocks = allocator.admit(0, 81)
    assert blocks is not None
    assert blocks.slot == allocator.num_groups - 1  # state runs are taken from the top
    assert blocks.pages == tuple(range(5, 15))  # blocks 1 and 2 (block 0 is vLLM's null)
    assert allocator.grow(0, 80) == list(range(15, 20))


def test_unified_refuses_models_it_cannot_place() -> None:
    with pytest.raises(ValueError, match="vLLM groups"):
        PlacedUnifiedAllocator(small_hybrid(4, 1), MemoryConfig(8 * MiB))


def _byte_ranges(allocator: PlacedUnifiedAllocator) -> list[tuple[int, int]]:
    """Every live unit's [start, end) in the shared buffer."""
    page, slot = allocator.spec.page_bytes, allocator.spec.slot_bytes
    ranges = []
    for request_id in allocator.request_ids:
        blocks = allocator.units(request_id)
        ranges += [(p * page, (p + 1) * page) for p in blocks.pages]
        if blocks.slot >= 0:
            ranges.append((blocks.slot * slot, (blocks.slot + 1) * slot))
    return sorted(ranges)


def _check_bytes(allocator: PlacedUnifiedAllocator) -> None:
    ranges = _byte_ranges(allocator)
    end = allocator.num_blocks * allocator.vllm.block_bytes
    assert all(start > 0 and stop <= end for start, stop in ranges), "outside the buffer"
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False)), "overlap"


_OPS = st.lists(
    st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 9), st.integers(1, 400)),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(
    ops=_OPS,
    num_attention=st.integers(1, 3),
    extra_recurrent=st.integers(0, 4),
    budget_mib=st.integers(2, 8),
)
def test_unified_decides_like_vllm_until_placement_bites(
    ops: list[tuple[str, int, int]], num_attention: int, extra_recurrent: int, budget_mib: int
) -> None:
    """Same admit/grow outcomes as the bookkeeping `UnifiedAllocator` as long as no
    placement failure happened; units never overlap in bytes."""
    geometry = small_hybrid(num_attention, num_attention + extra_recurrent, d_inner=512)
    config = MemoryConfig(budget_mib * MiB)
    placed, counted = PlacedUnifiedAllocator(geometry, config), UnifiedAllocator(geometry, config)
    assert placed.num_blocks == counted.num_blocks
    tokens: dict[int, int] = {}
    for op, request_id, amount in ops:
        live = request_id in tokens
        if op == "admit" and not live and counted.fits_alone(amount):
            assert placed.fits_alone(amount) == (placed.num_groups >= 2)
            if not placed.fits_alone(amount):
                continue
            ours, theirs = placed.admit(request_id, amount), counted.admit(request_id, amount)
            if ours is not None:
                tokens[request_id] = amount
        elif op == "grow" and live and counted.fits_alone(tokens[request_id] + amount):
            ours, theirs = placed.grow(request_id, amount), counted.grow(request_id, amount)
            if ours is not None:
                tokens[request_id] += amount
        elif op == "free" and live:
            placed.free(request_id)
            counted.free(request_id)
            del tokens[request_id]
            continue
        else:
            continue
        if placed.num_placement_failures:
            return  # from here on the two may differ (the documented deviation)
        assert (ours is None) == (theirs is None)
        placed.check_integrity()
        _check_bytes(placed)
        assert placed.usage() == counted.usage()


def test_unified_placement_failure_is_counted() -> None:
    """Two requests' blocks interleave; freeing one leaves holes but only one whole
    group, which the next request takes: the one after finds enough free blocks (vLLM
    admits it) but no whole group."""
    geometry = small_hybrid(2, 4, d_inner=512)  # 2 state blocks per request
    config = MemoryConfig(4 * MiB)
    placed, counted = PlacedUnifiedAllocator(geometry, config), UnifiedAllocator(geometry, config)
    assert placed.vllm.num_state_groups == 2
    tokens = placed.vllm.block_size
    assert tokens is not None
    for allocator in (placed, counted):
        assert allocator.admit(0, 1) is not None and allocator.admit(1, 1) is not None
        turn = 0
        while allocator.grow(turn % 2, tokens) is not None:  # one block each, in turn
            turn += 1
        allocator.free(0)
        assert allocator.admit(2, 1) is not None
    holes = placed.usage().kv_capacity_bytes - placed.usage().kv_used_bytes
    assert holes >= 3 * placed.vllm.block_bytes  # a run and a block would fit
    assert counted.admit(3, 1) is not None
    assert placed.admit(3, 1) is None
    assert placed.num_placement_failures == 1
    placed.check_integrity()
    _check_bytes(placed)
