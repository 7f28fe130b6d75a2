"""The unified layout: vLLM's block geometry for hybrid models, and its one pool of
equal blocks with a byte position for every block (kernel pages, state runs)."""

from __future__ import annotations

import math

import pytest
from hybrid_geometries import (
    fill,
    hybrid,
    jamba_mini,
    mamba1_layer,
    pure_attention,
    pure_recurrent,
    small_hybrid,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory.spec import NO_SLOT, AllocatorStats, MemoryConfig
from avmp.memory.unified import UnifiedAllocator, VllmBlockGeometry, unified_buffer_bytes
from avmp.models.geometry import AttentionLayer

MiB = 1 << 20
GiB = 1 << 30



# --------------------------------------------------------------- vLLM's block geometry


def test_jamba_unified_blocks_are_80_tokens() -> None:
    # One Mamba1 layer: conv 8192 x 3 + SSM 8192 x 16, bf16 = 311,296 B; one attention
    # layer: 4,096 B/token; 311,296 / 4,096 = 76 tokens -> next multiple of 16 = 80.
    allocator = UnifiedAllocator(jamba_mini(), MemoryConfig(12 * GiB))
    vllm = allocator.vllm
    assert vllm.block_size == 80
    assert vllm.page_bytes == 80 * 4096 == 327_680
    assert vllm.state_page_bytes == 311_296
    assert vllm.group_size == 4
    assert allocator.num_blocks == (12 * GiB) // (4 * 327_680)
    assert unified_buffer_bytes(jamba_mini(), MemoryConfig(12 * GiB)) == (
        allocator.num_blocks * allocator.block_bytes
    )
    assert allocator.num_usable_blocks == allocator.num_blocks - 1  # block 0: vLLM's null block
    assert (vllm.num_attention_groups, vllm.num_state_groups) == (1, 7)


def test_jamba_fp32_state_raises_block_to_144_tokens() -> None:
    # conv 49,152 B + SSM 8192 x 16 x 4 = 573,440 B -> 140 tokens -> 144.
    blocks = VllmBlockGeometry.from_geometry(jamba_mini("float32"))
    assert blocks.block_size == 144
    assert blocks.page_bytes == 144 * 4096


def test_unified_group_size_uses_larger_count_within_25_percent() -> None:
    def geometry_of(num_attention: int, num_recurrent: int) -> VllmBlockGeometry:
        attention = [AttentionLayer(i, 2, 64) for i in range(num_attention)]
        recurrent = [mamba1_layer(50 + i, d_inner=256) for i in range(num_recurrent)]
        return VllmBlockGeometry.from_geometry(hybrid("mix", attention, recurrent))

    blocks = geometry_of(8, 9)
    assert blocks.group_size == 9  # 9 < 8 * 1.25: one attention group with a padding layer
    assert (blocks.num_attention_groups, blocks.num_state_groups) == (1, 1)
    blocks = geometry_of(4, 5)
    assert blocks.group_size == 4  # 5 is not < 4 * 1.25
    assert (blocks.num_attention_groups, blocks.num_state_groups) == (1, 2)
    blocks = VllmBlockGeometry.from_geometry(small_hybrid(num_attention=2, num_recurrent=6))
    assert blocks.group_size == 2
    assert (blocks.num_attention_groups, blocks.num_state_groups) == (1, 3)


def test_unified_uses_largest_layer_when_shapes_differ() -> None:
    attention = [AttentionLayer(0, 2, 64), AttentionLayer(1, 4, 64)]  # 512 and 1,024 B/token
    recurrent = [mamba1_layer(2, d_inner=256), mamba1_layer(3, d_inner=512)]
    blocks = VllmBlockGeometry.from_geometry(hybrid("mixed", attention, recurrent))
    largest_state = 512 * 3 * 2 + 512 * 16 * 2
    assert blocks.state_page_bytes == largest_state
    assert blocks.block_size == 16 * math.ceil(largest_state / (16 * 1024))
    assert blocks.page_bytes == blocks.block_size * 1024 >= largest_state


# ------------------------------------------------------------------- the block pool


def test_unified_blocks_are_whole_kernel_pages_and_state_runs() -> None:
    """Jamba-1.5-Mini: 80-token blocks of four attention layers = 5 kernel pages of 16
    tokens; a request's state (28 Mamba layers) spans 7 blocks."""
    allocator = UnifiedAllocator(jamba_mini(), MemoryConfig(1024 * MiB))
    assert allocator.vllm.block_size == 80 and allocator.vllm.num_state_groups == 7
    fmt = allocator.cache_format()
    assert fmt.page.unit_bytes * 5 == allocator.block_bytes == allocator.spec.page_bytes * 5
    assert fmt.slot.unit_bytes == 7 * allocator.block_bytes >= fmt.slot.exact_bytes
    units = allocator.admit(0, 81)
    assert units is not None
    assert units.slot == allocator.num_groups - 1  # state runs are taken from the top
    assert units.pages == tuple(range(5, 15))  # blocks 1 and 2 (block 0 is vLLM's null)
    assert allocator.grow(0, 79) == []  # 160 tokens still fit two blocks
    assert allocator.grow(0, 1) == list(range(15, 20))
    assert allocator.usage().num_pages_used == 3  # counted in blocks
    allocator.check_integrity()


def test_unified_pure_recurrent_holds_one_block_of_all_layers() -> None:
    geometry = pure_recurrent(num_layers=4, d_inner=1024)
    allocator = UnifiedAllocator(geometry, MemoryConfig(64 * MiB))
    assert allocator.vllm.block_size is None and allocator.vllm.group_size == 4
    assert allocator.block_bytes == geometry.state_bytes_per_request
    units = allocator.admit(0, 10_000)
    assert units is not None and units.pages == () and units.slot != NO_SLOT
    assert allocator.grow(0, 10_000) == []
    allocator.free(0)
    assert fill(allocator, 1) == allocator.num_usable_blocks


def test_unified_pure_attention_keeps_config_block_size() -> None:
    allocator = UnifiedAllocator(pure_attention(num_layers=4), MemoryConfig(64 * MiB))
    assert allocator.vllm.block_size == 16
    units = allocator.admit(0, 17)
    assert units is not None and units.slot == NO_SLOT and len(units.pages) == 2


def test_unified_refuses_models_it_cannot_place() -> None:
    """Four attention layers against one recurrent layer form four vLLM groups; our
    kernels read a block as kernel pages of every attention layer, so that is refused."""
    with pytest.raises(ValueError, match="vLLM groups"):
        UnifiedAllocator(small_hybrid(4, 1), MemoryConfig(8 * MiB))


def _check_bytes(allocator: UnifiedAllocator) -> None:
    """Every live unit lies inside the buffer, past the null block, and none overlap."""
    page, slot = allocator.spec.page_bytes, allocator.spec.slot_bytes
    ranges = []
    for request_id in allocator.request_ids:
        units = allocator.units(request_id)
        ranges += [(p * page, (p + 1) * page) for p in units.pages]
        if units.slot >= 0:
            ranges.append((units.slot * slot, (units.slot + 1) * slot))
    ranges.sort()
    end = allocator.num_blocks * allocator.block_bytes
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
    """vLLM admits or grows whenever enough blocks are free; so do we, as long as no
    placement failure happened. Units never overlap in bytes."""
    geometry = small_hybrid(num_attention, num_attention + extra_recurrent, d_inner=512)
    allocator = UnifiedAllocator(geometry, MemoryConfig(budget_mib * MiB))
    free_blocks = allocator.num_usable_blocks  # vLLM's only criterion, kept here
    held: dict[int, int] = {}  # request -> blocks it holds
    tokens: dict[int, int] = {}
    for op, request_id, amount in ops:
        live = request_id in tokens
        if op == "free" and live:
            allocator.free(request_id)
            free_blocks += held.pop(request_id)
            del tokens[request_id]
            continue
        if op == "admit" and not live and allocator.fits_alone(amount):
            need = allocator.num_blocks_for(amount)
            ours = allocator.admit(request_id, amount) is not None
            new_tokens = amount
        elif op == "grow" and live and allocator.fits_alone(tokens[request_id] + amount):
            new_tokens = tokens[request_id] + amount
            need = allocator.num_blocks_for(new_tokens) - held[request_id]
            ours = allocator.grow(request_id, amount) is not None
        else:
            continue
        if allocator.num_placement_failures:
            return  # from here on the two may differ (the documented deviation)
        assert ours == (need <= free_blocks)
        if ours:
            free_blocks -= need
            held[request_id] = held.get(request_id, 0) + need
            tokens[request_id] = new_tokens
        allocator.check_integrity()
        _check_bytes(allocator)


def test_unified_placement_failure_is_counted() -> None:
    """Two requests' blocks interleave; freeing one leaves holes but only one whole
    group, which the next request takes: the one after finds enough free blocks (vLLM
    admits it) but no whole group."""
    geometry = small_hybrid(2, 4, d_inner=512)  # 2 state blocks per request
    allocator = UnifiedAllocator(geometry, MemoryConfig(4 * MiB))
    assert allocator.vllm.num_state_groups == 2
    tokens = allocator.vllm.block_size
    assert tokens is not None
    assert allocator.admit(0, 1) is not None and allocator.admit(1, 1) is not None
    turn = 0
    while allocator.grow(turn % 2, tokens) is not None:  # one block each, in turn
        turn += 1
    allocator.free(0)
    assert allocator.admit(2, 1) is not None
    usage = allocator.usage()
    holes = usage.kv_capacity_bytes - usage.kv_used_bytes
    assert holes >= 3 * allocator.block_bytes  # a run and a block would fit: vLLM admits
    assert allocator.admit(3, 1) is None
    assert allocator.num_placement_failures == 1 and allocator.stats.num_oom_events == 2
    allocator.check_integrity()
    _check_bytes(allocator)


class _PlacementRule:
    """The module doc's placement rule, one block at a time and without any map: state
    runs take the highest wholly free group; attention blocks take the lowest free block
    outside a wholly free group, breaking the lowest whole group only when none is left.
    Blocks past the last whole group belong to no group (they are always holes)."""

    def __init__(self, allocator: UnifiedAllocator) -> None:
        self.run, self.num_groups = allocator.vllm.num_state_groups, allocator.num_groups
        self.free = set(range(1, allocator.num_blocks))  # block 0: vLLM's null block
        self.pages_per_block = allocator.block_bytes // allocator.spec.page_bytes

    def group(self, group: int) -> range:
        return range(group * self.run, (group + 1) * self.run)

    def whole(self, group: int) -> bool:
        return all(b in self.free for b in self.group(group))

    def take_run(self) -> int:
        whole = [g for g in range(self.num_groups) if self.whole(g)]
        if not whole:
            return NO_SLOT
        self.free -= set(self.group(whole[-1]))
        return whole[-1]

    def take_block(self) -> int:
        holes = [b for b in sorted(self.free) if not self._in_whole(b)]
        block = holes[0] if holes else min(self.group(next(
            g for g in range(self.num_groups) if self.whole(g))))  # fmt: skip
        self.free.remove(block)
        return block

    def _in_whole(self, block: int) -> bool:
        group = block // self.run if self.run else -1
        return 0 <= group < self.num_groups and self.whole(group)

    def kernel_pages(self, blocks: list[int]) -> list[int]:
        k = self.pages_per_block
        return [b * k + i for b in blocks for i in range(k)]


@settings(max_examples=40, deadline=None)
@given(ops=_OPS, extra_recurrent=st.integers(0, 3), budget_mib=st.integers(2, 6))
def test_unified_hands_out_blocks_by_its_placement_rule(
    ops: list[tuple[str, int, int]], extra_recurrent: int, budget_mib: int
) -> None:
    """Every admission and grow gets exactly the blocks the rule names, in order (the
    allocator takes runs of holes at once; the rule takes one block at a time), and a
    refusal happens exactly when the rule finds no room."""
    geometry = small_hybrid(1, 1 + extra_recurrent, d_inner=512)
    allocator = UnifiedAllocator(geometry, MemoryConfig(budget_mib * MiB))
    rule = _PlacementRule(allocator)
    blocks: dict[int, list[int]] = {}  # request -> its attention blocks
    runs: dict[int, int] = {}  # request -> its state group
    tokens: dict[int, int] = {}
    for op, request_id, amount in ops:
        live = request_id in tokens
        if op == "free":
            if live:
                allocator.free(request_id)
                rule.free |= set(blocks.pop(request_id))
                rule.free |= set(rule.group(runs.pop(request_id)))
                del tokens[request_id]
            continue
        if (op == "admit") == live or not allocator.fits_alone(amount + tokens.get(request_id, 0)):
            continue
        new_tokens = amount + tokens.get(request_id, 0)
        held = blocks.get(request_id, [])
        extra = allocator.num_blocks_for(new_tokens) - rule.run - len(held)
        state = rule.run if op == "admit" else 0
        expected: tuple[int, list[int]] | None = None
        has_group = op == "grow" or any(rule.whole(g) for g in range(rule.num_groups))
        if extra + state <= len(rule.free) and has_group:  # else: short, or no whole group
            run = rule.take_run() if op == "admit" else runs[request_id]
            added = [rule.take_block() for _ in range(extra)]
            expected = (run, rule.kernel_pages(added))
            blocks[request_id], runs[request_id] = held + added, run
            tokens[request_id] = new_tokens
        if op == "admit":
            got = allocator.admit(request_id, amount)
            assert (got and (got.slot, list(got.pages))) == expected
        else:
            assert allocator.grow(request_id, amount) == (expected and expected[1])
        allocator.check_integrity()


def test_unified_past_the_id_cache_decides_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool too large to keep its ids as int objects slices a range instead: the
    same calls get the same answers."""
    geometry = small_hybrid(1, 2, d_inner=512)
    calls = [("admit", 0, 150), ("admit", 1, 40), ("grow", 0, 200), ("free", 1, 0),
             ("admit", 2, 300), ("grow", 2, 90), ("free", 0, 0), ("admit", 3, 700)]  # fmt: skip

    def answers() -> tuple[list[object], type, AllocatorStats]:
        allocator = UnifiedAllocator(geometry, MemoryConfig(6 * MiB))
        out: list[object] = []
        for op, request_id, amount in calls:
            out.append(getattr(allocator, op)(request_id, *([amount] if amount else [])))
            allocator.check_integrity()
        return out, type(allocator._page_ids), allocator.stats

    cached, cached_ids, cached_stats = answers()
    monkeypatch.setattr("avmp.memory.unified.MAX_CACHED_IDS", 0)
    ranged, ranged_ids, ranged_stats = answers()
    assert cached_ids is list and ranged_ids is range
    assert cached == ranged and cached_stats == ranged_stats
    assert sum(1 for answer in cached if answer) >= 4, cached  # units were handed out
