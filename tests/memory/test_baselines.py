"""The baselines: vLLM's unified padded pool, SGLang's static split and the oracle."""

from __future__ import annotations

import math

import pytest
from hybrid_geometries import (
    hybrid,
    jamba_mini,
    mamba1_layer,
    pure_attention,
    pure_recurrent,
    small_hybrid,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory.baselines import (
    NO_SLOT,
    OracleAllocator,
    StaticAllocator,
    UnifiedAllocator,
    VllmBlockGeometry,
    static_state_fraction,
)
from avmp.memory.registry import ALLOCATOR_NAMES, make_allocator
from avmp.memory.spec import (
    CacheAllocator,
    DoubleFreeError,
    DuplicateRequestError,
    MemoryConfig,
    RequestTooLargeError,
    UnknownRequestError,
)
from avmp.models.geometry import AttentionLayer, ModelGeometry

MiB = 1 << 20
GiB = 1 << 30
BASELINES = (UnifiedAllocator, StaticAllocator, OracleAllocator)


def fill(allocator: CacheAllocator, num_tokens: int) -> int:
    """Admit requests of ``num_tokens`` until memory is short; return how many fit."""
    count = 0
    while allocator.admit(count, num_tokens) is not None:
        count += 1
    allocator.check_integrity()
    return count


def snapshot(allocator: CacheAllocator) -> tuple[object, ...]:
    ids = allocator.request_ids
    return (
        allocator.usage(),
        ids,
        [allocator.units(i) for i in ids],
        [allocator.num_tokens(i) for i in ids],
    )


# ----------------------------------------------------------------------------- unified


def test_jamba_unified_blocks_are_80_tokens() -> None:
    # One Mamba1 layer: conv 8192 x 3 + SSM 8192 x 16, bf16 = 311,296 B; one attention
    # layer: 4,096 B/token; 311,296 / 4,096 = 76 tokens -> next multiple of 16 = 80.
    allocator = UnifiedAllocator(jamba_mini(), MemoryConfig(12 * GiB))
    assert allocator.block_size == 80
    assert allocator.page_bytes == 80 * 4096 == 327_680
    assert allocator.vllm.state_page_bytes == 311_296
    assert allocator.group_size == 4
    assert allocator.num_blocks == (12 * GiB) // (4 * 327_680)
    assert allocator.num_usable_blocks == allocator.num_blocks - 1  # block 0: vLLM's null block
    assert (allocator.vllm.num_attention_groups, allocator.vllm.num_state_groups) == (1, 7)


def test_jamba_fp32_state_raises_block_to_144_tokens() -> None:
    # conv 49,152 B + SSM 8192 x 16 x 4 = 573,440 B -> 140 tokens -> 144.
    blocks = VllmBlockGeometry.from_geometry(jamba_mini("float32"))
    assert blocks.block_size == 144
    assert blocks.page_bytes == 144 * 4096


def test_request_holds_one_block_per_state_group_plus_token_blocks() -> None:
    allocator = UnifiedAllocator(jamba_mini(), MemoryConfig(1 * GiB))
    blocks = allocator.admit(1, 81)
    assert blocks is not None
    assert len(blocks.pages) == 2  # ceil(81 / 80) for the one attention group
    assert len(allocator.state_blocks(1)) == 7
    assert blocks.slot == allocator.state_blocks(1)[0]
    assert allocator.grow(1, 79) == []  # 160 tokens still fit two blocks
    added = allocator.grow(1, 1)
    assert added is not None and len(added) == 1
    assert allocator.units(1).pages == (*blocks.pages, *added)
    assert allocator.usage().num_pages_used == 3
    assert 0 not in (*allocator.state_blocks(1), *allocator.units(1).pages)  # the null block
    allocator.check_integrity()


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


def test_unified_pure_recurrent_holds_one_block_of_all_layers() -> None:
    geometry = pure_recurrent(num_layers=4, d_inner=1024)
    allocator = UnifiedAllocator(geometry, MemoryConfig(64 * MiB))
    assert allocator.block_size is None
    assert allocator.group_size == 4
    assert allocator.block_bytes == geometry.state_bytes_per_request
    blocks = allocator.admit(0, 10_000)
    assert blocks is not None and blocks.pages == () and blocks.slot != NO_SLOT
    assert allocator.grow(0, 10_000) == []
    allocator.free(0)
    assert fill(allocator, 1) == allocator.num_blocks - 1 == allocator.num_usable_blocks


def test_unified_pure_attention_keeps_config_block_size() -> None:
    allocator = UnifiedAllocator(pure_attention(num_layers=4), MemoryConfig(64 * MiB))
    assert allocator.block_size == 16
    blocks = allocator.admit(0, 17)
    assert blocks is not None and blocks.slot == NO_SLOT and len(blocks.pages) == 2


def test_unified_with_several_attention_groups_lists_pages_group_by_group() -> None:
    attention = [AttentionLayer(i, 2, 64) for i in range(4)]
    geometry = hybrid("4+1", attention, [mamba1_layer(9, d_inner=64)])
    allocator = UnifiedAllocator(geometry, MemoryConfig(64 * MiB))
    assert allocator.vllm.num_attention_groups == 4
    tokens = allocator.block_size or 0
    blocks = allocator.admit(0, tokens)
    assert blocks is not None and len(blocks.pages) == 4
    added = allocator.grow(0, 1)
    assert added is not None and len(added) == 4
    pages = allocator.units(0).pages
    assert [pages[2 * g + 1] for g in range(4)] == added  # group g: [old_g, new_g]
    allocator.check_integrity()


# ------------------------------------------------------------------------------ static


def test_static_split_follows_sglang_ratio() -> None:
    geometry = jamba_mini()
    assert static_state_fraction(geometry) == pytest.approx(0.9 / 1.9)
    assert static_state_fraction(geometry, mamba_full_memory_ratio=1.0) == 0.5
    assert static_state_fraction(geometry, state_fraction=0.3) == 0.3
    allocator = StaticAllocator(geometry, MemoryConfig(12 * GiB))
    state_budget = int(12 * GiB * 0.9 / 1.9)
    assert allocator.num_slots == state_budget // geometry.state_bytes_per_request
    assert allocator.num_pages == (12 * GiB - state_budget) // (16 * 16_384)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"state_fraction": 0.0},
        {"state_fraction": 1.0},
        {"mamba_full_memory_ratio": 0.0},
        {"state_fraction": 0.5, "mamba_full_memory_ratio": 1.0},
    ],
)
def test_static_rejects_bad_split(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StaticAllocator(jamba_mini(), MemoryConfig(1 * GiB), **kwargs)


def test_static_full_state_pool_stops_admission_while_kv_is_free() -> None:
    allocator = StaticAllocator(jamba_mini(), MemoryConfig(1 * GiB), state_fraction=0.1)
    admitted = fill(allocator, 1)
    assert admitted == allocator.num_slots
    usage = allocator.usage()
    assert usage.kv_used_bytes < usage.kv_capacity_bytes / 100


def test_static_full_kv_pool_stops_admission_while_slots_are_free() -> None:
    allocator = StaticAllocator(jamba_mini(), MemoryConfig(1 * GiB), state_fraction=0.9)
    admitted = fill(allocator, 4096)
    assert admitted == allocator.num_pages // 256 < allocator.num_slots
    assert allocator.usage().num_pages_used == admitted * 256


def test_static_single_kind_models_give_the_whole_budget_to_it() -> None:
    assert static_state_fraction(pure_recurrent()) == 1.0
    assert static_state_fraction(pure_attention()) == 0.0
    allocator = StaticAllocator(pure_recurrent(), MemoryConfig(64 * MiB))
    assert allocator.num_pages == 0 and fill(allocator, 100) == allocator.num_slots


# ------------------------------------------------------------------------------ oracle


def test_oracle_admits_exactly_what_the_bytes_allow() -> None:
    geometry = jamba_mini()
    allocator = OracleAllocator(geometry, MemoryConfig(12 * GiB))
    assert fill(allocator, 768) == (12 * GiB) // geometry.request_bytes(768)
    assert allocator.usage().used_bytes <= 12 * GiB


def test_oracle_rounds_kv_to_config_pages() -> None:
    geometry = small_hybrid()
    allocator = OracleAllocator(geometry, MemoryConfig(2 * MiB, block_size=16))
    allocator.admit(0, 17)
    assert allocator.usage().kv_used_bytes == 32 * geometry.kv_bytes_per_token


@pytest.mark.parametrize("num_tokens", [1, 100, 531, 532, 2000, 20_000])
def test_oracle_holds_at_least_as_many_as_any_baseline(num_tokens: int) -> None:
    geometry, config = jamba_mini(), MemoryConfig(4 * GiB)
    oracle = fill(OracleAllocator(geometry, config), num_tokens)
    assert oracle >= fill(UnifiedAllocator(geometry, config), num_tokens)
    assert oracle >= fill(StaticAllocator(geometry, config), num_tokens)


# ------------------------------------------------------------------ shared contract


@pytest.mark.parametrize("cls", BASELINES)
def test_misuse_raises_clear_errors(cls: type[CacheAllocator]) -> None:
    allocator = cls(small_hybrid(), MemoryConfig(4 * MiB))
    allocator.admit(1, 10)
    with pytest.raises(DuplicateRequestError):
        allocator.admit(1, 10)
    with pytest.raises(UnknownRequestError):
        allocator.grow(2, 1)
    with pytest.raises(UnknownRequestError):
        allocator.free(2)
    with pytest.raises(UnknownRequestError):
        allocator.units(2)
    allocator.free(1)
    with pytest.raises(DoubleFreeError):
        allocator.free(1)
    with pytest.raises(UnknownRequestError):
        allocator.num_tokens(1)
    assert allocator.admit(1, 10) is not None  # a preempted request may come back
    allocator.free(1)
    assert allocator.request_ids == []


@pytest.mark.parametrize("cls", BASELINES)
def test_requests_larger_than_memory_raise(cls: type[CacheAllocator]) -> None:
    allocator = cls(small_hybrid(), MemoryConfig(2 * MiB))
    too_many = 1_000_000
    assert not allocator.fits_alone(too_many)
    assert allocator.fits_alone(1)
    with pytest.raises(RequestTooLargeError):
        allocator.admit(1, too_many)
    allocator.admit(1, 1)
    with pytest.raises(RequestTooLargeError):
        allocator.grow(1, too_many)
    assert allocator.num_tokens(1) == 1


@pytest.mark.parametrize("cls", BASELINES)
def test_failed_calls_change_nothing(cls: type[CacheAllocator]) -> None:
    allocator = cls(small_hybrid(), MemoryConfig(2 * MiB))
    count = fill(allocator, 100)
    assert count > 0
    before = snapshot(allocator)
    assert allocator.admit(count, 100) is None
    assert allocator.fits_alone(2000)
    grow_result = allocator.grow(0, 2000 - 100)  # fits alone, not now
    assert grow_result is None
    assert snapshot(allocator) == before
    assert allocator.stats.num_oom_events == 3  # the fill's last try, plus two
    allocator.free(0)
    assert allocator.admit(count, 100) is not None


@pytest.mark.parametrize("cls", BASELINES)
def test_freeing_everything_restores_the_empty_state(cls: type[CacheAllocator]) -> None:
    allocator = cls(jamba_mini(), MemoryConfig(1 * GiB))
    empty = allocator.usage()
    count = fill(allocator, 300)
    for request_id in range(count):
        allocator.free(request_id)
    allocator.check_integrity()
    assert allocator.usage() == empty
    assert fill(allocator, 300) == count


@pytest.mark.parametrize("name", ["unified", "static", "oracle"])
def test_registry_builds_baselines_by_name(name: str) -> None:
    allocator = make_allocator(name, small_hybrid(), MemoryConfig(2 * MiB))
    assert allocator.name == name
    assert name in ALLOCATOR_NAMES


def test_registry_passes_options_and_rejects_unknown_names() -> None:
    allocator = make_allocator("static", small_hybrid(), MemoryConfig(2 * MiB), state_fraction=0.25)
    assert isinstance(allocator, StaticAllocator) and allocator.state_fraction == 0.25
    with pytest.raises(ValueError, match="known: avmp, unified, static, oracle"):
        make_allocator("paged", small_hybrid(), MemoryConfig(2 * MiB))


def test_registry_builds_avmp() -> None:
    allocator = make_allocator("avmp", small_hybrid(), MemoryConfig(4 * MiB))
    assert allocator.name == "avmp"
    assert allocator.admit(0, 10) is not None


# ------------------------------------------------------------- random call sequences

_OPS = st.lists(
    st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 11), st.integers(0, 600)),
    max_size=60,
)


def _replay(allocator: CacheAllocator, ops: list[tuple[str, int, int]]) -> list[object]:
    """Drive the allocator, checking invariants and a token model after every call."""
    tokens: dict[int, int] = {}
    decisions: list[object] = []
    for op, request_id, amount in ops:
        live = request_id in tokens
        if op == "admit" and not live and allocator.fits_alone(amount):
            result: object = allocator.admit(request_id, amount)
            if result is not None:
                tokens[request_id] = amount
        elif op == "grow" and live and allocator.fits_alone(tokens[request_id] + amount):
            result = allocator.grow(request_id, amount)
            if result is not None:
                tokens[request_id] += amount
        elif op == "free" and live:
            result = allocator.free(request_id)
            del tokens[request_id]
        else:
            continue
        decisions.append(result)
        allocator.check_integrity()
        assert sorted(allocator.request_ids) == sorted(tokens)
        assert all(allocator.num_tokens(i) == n for i, n in tokens.items())
        usage = allocator.usage()
        assert usage.kv_used_bytes <= usage.kv_capacity_bytes
        assert usage.state_used_bytes <= usage.state_capacity_bytes
        assert usage.used_bytes >= usage.needed_bytes
        assert usage.unassigned_bytes >= 0
    return decisions


@settings(max_examples=40, deadline=None)
@given(
    ops=_OPS,
    cls=st.sampled_from(BASELINES),
    num_attention=st.integers(0, 3),
    num_recurrent=st.integers(0, 5),
    budget_mib=st.integers(2, 6),
)
def test_random_sequences_keep_invariants_and_are_deterministic(
    ops: list[tuple[str, int, int]],
    cls: type[CacheAllocator],
    num_attention: int,
    num_recurrent: int,
    budget_mib: int,
) -> None:
    if num_attention + num_recurrent == 0:
        num_recurrent = 1
    geometry: ModelGeometry = small_hybrid(num_attention, num_recurrent, d_inner=512)
    config = MemoryConfig(budget_mib * MiB)
    first = _replay(cls(geometry, config), ops)
    assert _replay(cls(geometry, config), ops) == first
