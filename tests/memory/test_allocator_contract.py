"""The contract every layout keeps, checked with the same calls on each: AVMP, its static
split, vLLM's unified pool and the oracle, bookkeeping only and with a backing where one
applies. `check_integrity` runs after every call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hybrid_geometries import small_hybrid
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory.backing.host import HostBacking
from avmp.memory.backing.shared_buffer import SharedBufferBacking
from avmp.memory.registry import make_allocator
from avmp.memory.requests import MAX_REMEMBERED_FREES, RecentFrees
from avmp.memory.spec import (
    AllocatorError,
    CacheAllocator,
    DoubleFreeError,
    DuplicateRequestError,
    MemoryConfig,
    RequestTooLargeError,
    UnknownRequestError,
)
from avmp.memory.unified import unified_buffer_bytes
from avmp.models.geometry import ModelGeometry

MiB = 1 << 20
Build = Callable[[ModelGeometry, MemoryConfig], CacheAllocator]


def _plain(name: str) -> Build:
    return lambda geometry, config: make_allocator(name, geometry, config)


def _on_host(name: str) -> Build:
    return lambda geometry, config: make_allocator(name, geometry, config, HostBacking())


def _on_shared_buffer(geometry: ModelGeometry, config: MemoryConfig) -> CacheAllocator:
    backing = SharedBufferBacking(unified_buffer_bytes(geometry, config))
    return make_allocator("unified", geometry, config, backing)


LAYOUTS: dict[str, Build] = {
    "avmp": _plain("avmp"),
    "avmp+host": _on_host("avmp"),
    "static": _plain("static"),
    "static+host": _on_host("static"),
    "unified": _plain("unified"),
    "unified+buffer": _on_shared_buffer,
    "oracle": _plain("oracle"),
}
every_layout = pytest.mark.parametrize("layout", list(LAYOUTS))


def build(layout: str, budget_mib: int = 4, geometry: ModelGeometry | None = None
          ) -> CacheAllocator:  # fmt: skip
    return LAYOUTS[layout](geometry or small_hybrid(), MemoryConfig(budget_mib * MiB))


def snapshot(allocator: CacheAllocator) -> tuple[object, ...]:
    ids = allocator.request_ids
    return (
        allocator.usage(),
        ids,
        [allocator.units(i) for i in ids],
        [allocator.num_tokens(i) for i in ids],
        allocator.stats.num_admits,
        allocator.stats.num_grows,
        allocator.stats.num_frees,
    )


def fill(allocator: CacheAllocator, num_tokens: int, first_id: int = 0) -> int:
    count = 0
    while allocator.admit(first_id + count, num_tokens) is not None:
        count += 1
        allocator.check_integrity()
    return count


@every_layout
def test_admit_grow_free_round_trip(layout: str) -> None:
    allocator = build(layout)
    units = allocator.admit(7, 20)
    allocator.check_integrity()
    assert units is not None and allocator.units(7) == units
    assert allocator.num_tokens(7) == 20 and allocator.request_ids == [7]
    added = allocator.grow(7, 30)
    allocator.check_integrity()
    assert added is not None and allocator.units(7).pages == (*units.pages, *added)
    assert allocator.num_tokens(7) == 50
    allocator.free(7)
    allocator.check_integrity()
    assert allocator.request_ids == [] and allocator.usage().num_requests == 0
    stats = allocator.stats
    assert (stats.num_admits, stats.num_grows, stats.num_frees) == (1, 1, 1)


@every_layout
def test_misuse_raises_clear_errors_and_changes_nothing(layout: str) -> None:
    allocator = build(layout)
    allocator.admit(1, 10)
    before = snapshot(allocator)
    with pytest.raises(DuplicateRequestError):
        allocator.admit(1, 10)
    for call in (lambda: allocator.grow(2, 1), lambda: allocator.units(2),
                 lambda: allocator.num_tokens(2)):  # fmt: skip
        with pytest.raises(UnknownRequestError, match="not live"):
            call()
    with pytest.raises(UnknownRequestError, match="never admitted or already freed"):
        allocator.free(2)
    allocator.check_integrity()
    assert snapshot(allocator) == before
    allocator.free(1)
    with pytest.raises(DoubleFreeError, match="already freed"):
        allocator.free(1)
    with pytest.raises(UnknownRequestError) as grown:
        allocator.grow(1, 1)
    assert not isinstance(grown.value, DoubleFreeError)  # a grow is not a free
    assert allocator.admit(1, 10) is not None  # a preempted request may come back
    allocator.free(1)
    allocator.check_integrity()
    assert allocator.request_ids == []


@every_layout
@pytest.mark.parametrize("tokens", [0, -3])
def test_token_counts_below_one_are_refused_everywhere(layout: str, tokens: int) -> None:
    allocator = build(layout)
    allocator.admit(1, 10)
    before = snapshot(allocator)
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        allocator.admit(2, tokens)
    with pytest.raises(ValueError, match="num_new_tokens must be positive"):
        allocator.grow(1, tokens)
    allocator.check_integrity()
    assert snapshot(allocator) == before


@every_layout
@pytest.mark.parametrize("bad", [1.0, 2.5, True, "3", None])
def test_ids_and_token_counts_must_be_ints(layout: str, bad: object) -> None:
    allocator = build(layout)
    allocator.admit(1, 10)
    before = snapshot(allocator)
    with pytest.raises(TypeError, match="request_id must be an int"):
        allocator.admit(bad, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        allocator.admit(2, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_new_tokens must be an int"):
        allocator.grow(1, bad)  # type: ignore[arg-type]
    calls: list[Callable[[], object]] = [
        lambda: allocator.free(bad),  # type: ignore[arg-type]
        lambda: allocator.units(bad),  # type: ignore[arg-type]
        lambda: allocator.num_tokens(bad),  # type: ignore[arg-type]
        lambda: allocator.grow(bad, 1),  # type: ignore[arg-type]
    ]
    for call in calls:  # 1.0 == 1: a lookup before the check would reach request 1
        with pytest.raises(TypeError, match="request_id must be an int"):
            call()
    allocator.check_integrity()
    assert snapshot(allocator) == before


@every_layout
def test_requests_larger_than_memory_raise(layout: str) -> None:
    allocator = build(layout, budget_mib=4)
    too_many = 1_000_000
    assert not allocator.fits_alone(too_many) and allocator.fits_alone(1)
    with pytest.raises(RequestTooLargeError):
        allocator.admit(1, too_many)
    allocator.admit(1, 1)
    before = snapshot(allocator)
    with pytest.raises(RequestTooLargeError):
        allocator.grow(1, too_many)
    allocator.check_integrity()
    assert snapshot(allocator) == before


@every_layout
def test_running_out_is_none_counted_and_changes_nothing(layout: str) -> None:
    allocator = build(layout, budget_mib=4)
    count = fill(allocator, 100)
    assert count > 0 and allocator.stats.num_oom_events == 1  # the fill's last try
    before = snapshot(allocator)
    assert allocator.admit(count, 100) is None
    assert allocator.fits_alone(2000)
    assert allocator.grow(0, 2000 - 100) is None  # fits alone, not now
    allocator.check_integrity()
    assert snapshot(allocator) == before
    assert allocator.stats.num_oom_events == 3
    allocator.free(0)
    assert allocator.admit(count, 100) is not None


@every_layout
def test_freeing_everything_restores_the_empty_state(layout: str) -> None:
    allocator = build(layout, budget_mib=8)
    count = fill(allocator, 300)
    full = allocator.usage()
    for request_id in range(count):
        allocator.free(request_id)
        allocator.check_integrity()
    assert allocator.usage().num_requests == 0 and allocator.usage().used_bytes == 0
    assert fill(allocator, 300, first_id=count) == count
    assert allocator.usage() == full


@every_layout
def test_freed_ids_are_remembered_for_a_window_only(layout: str) -> None:
    """A long-running server frees ids forever: only the recent ones are kept, so a free
    long ago reads as 'not live' while a free just now is still a double free."""
    allocator = build(layout)
    for request_id in range(MAX_REMEMBERED_FREES + 10):
        allocator.admit(request_id, 1)
        allocator.free(request_id)
    with pytest.raises(UnknownRequestError) as old:
        allocator.free(0)
    assert not isinstance(old.value, DoubleFreeError)
    with pytest.raises(DoubleFreeError):
        allocator.free(MAX_REMEMBERED_FREES + 9)
    allocator.check_integrity()


# ------------------------------------------------------------- the prefix cache's units


def _kernel_pages_per_unit(allocator: CacheAllocator) -> int:
    return allocator.kv_unit_tokens // allocator.config.block_size


@every_layout
def test_cached_units_outlive_their_request_and_are_shared(layout: str) -> None:
    allocator = build(layout, budget_mib=8)
    unit = allocator.kv_unit_tokens
    allocator.admit(1, 2 * unit + 5)
    k = _kernel_pages_per_unit(allocator)
    first_two = allocator.units(1).pages[: 2 * k]
    keys = [allocator.cache_kv_unit(1, 0), allocator.cache_kv_unit(1, 1)]
    allocator.check_integrity()
    assert allocator.cached_keys() == keys and allocator.usage().kv_cached_bytes == 0
    allocator.free(1)
    allocator.check_integrity()
    held = allocator.usage()
    assert held.num_requests == 0 and held.kv_cached_bytes > 0 and held.kv_needed_bytes == 0
    assert [allocator.cached_unit(key) for key in keys] == [p // k for p in first_two[::k]]
    for request_id in (2, 3):  # two requests share the cached units read-only
        units = allocator.admit(request_id, 2 * unit + 1, cached=keys)
        allocator.check_integrity()
        assert units is not None and units.pages[: 2 * k] == first_two
        assert len(set(units.pages)) == len(units.pages)
    assert allocator.usage().kv_cached_bytes == 0  # live requests hold them now
    assert allocator.units(2).pages[2 * k :] != allocator.units(3).pages[2 * k :]
    for key in keys:
        allocator.release_cached(key)
        allocator.check_integrity()
    assert allocator.units(2).pages[: 2 * k] == first_two  # still held by the requests
    allocator.free(2)
    allocator.free(3)
    allocator.check_integrity()
    usage = allocator.usage()
    assert usage.used_bytes == 0 and usage.num_pages_used == 0 and allocator.cached_keys() == []


@every_layout
def test_checkpoints_are_slots_only_the_cache_holds(layout: str) -> None:
    allocator = build(layout, budget_mib=8)
    allocator.admit(1, 10)
    key = allocator.cache_checkpoint()
    assert key is not None
    allocator.check_integrity()
    usage = allocator.usage()
    assert usage.state_cached_bytes == allocator.cache_format().slot.unit_bytes
    assert allocator.cached_unit(key) != allocator.units(1).slot
    allocator.release_cached(key)
    allocator.check_integrity()
    assert allocator.usage().state_cached_bytes == 0
    keys = []
    while (key := allocator.cache_checkpoint()) is not None:  # running out is None
        keys.append(key)
        allocator.check_integrity()
    assert keys and allocator.admit(2, 10) is None
    allocator.release_cached(keys[0])
    assert allocator.admit(2, 10) is not None
    allocator.check_integrity()


@every_layout
def test_a_freed_requests_slot_can_stay_as_a_checkpoint(layout: str) -> None:
    allocator = build(layout, budget_mib=8)
    unit = allocator.kv_unit_tokens
    allocator.admit(1, unit + 5)
    slot, page_key = allocator.units(1).slot, allocator.cache_kv_unit(1, 0)
    key = allocator.free_keeping_slot(1)
    allocator.check_integrity()
    assert allocator.request_ids == [] and allocator.cached_unit(key) == slot
    usage = allocator.usage()
    assert usage.num_requests == 0 and usage.state_needed_bytes == 0
    assert usage.state_cached_bytes == allocator.cache_format().slot.unit_bytes
    with pytest.raises(DoubleFreeError):
        allocator.free(1)
    for held in (key, page_key):
        allocator.release_cached(held)
    allocator.check_integrity()
    assert allocator.usage().used_bytes == 0 and allocator.stats.num_frees == 1


@every_layout
def test_cache_misuse_raises_and_changes_nothing(layout: str) -> None:
    allocator = build(layout, budget_mib=8)
    unit = allocator.kv_unit_tokens
    allocator.admit(1, unit + 3)
    page_key = allocator.cache_kv_unit(1, 0)
    checkpoint = allocator.cache_checkpoint()
    assert checkpoint is not None
    before = (snapshot(allocator), allocator.cached_keys())
    for call in (
        lambda: allocator.cache_kv_unit(1, 1),  # a partial unit
        lambda: allocator.cache_kv_unit(1, -1),
        lambda: allocator.release_cached(99),
        lambda: allocator.cached_unit(99),
        lambda: allocator.admit(2, unit, cached=[checkpoint]),
        lambda: allocator.admit(2, unit - 1, cached=[page_key]),  # more than its tokens
    ):
        with pytest.raises(AllocatorError):
            call()
    with pytest.raises(UnknownRequestError):
        allocator.cache_kv_unit(5, 0)
    allocator.check_integrity()
    assert (snapshot(allocator), allocator.cached_keys()) == before
    allocator.release_cached(page_key)
    with pytest.raises(AllocatorError):
        allocator.release_cached(page_key)  # released twice


def test_a_model_without_state_has_no_checkpoints() -> None:
    for layout in ("avmp", "static", "unified", "oracle"):
        allocator = build(layout, geometry=small_hybrid(2, 0))
        with pytest.raises(AllocatorError, match="no recurrent state"):
            allocator.cache_checkpoint()
        allocator.admit(1, 10)
        with pytest.raises(AllocatorError, match="no recurrent state"):
            allocator.free_keeping_slot(1)
        assert allocator.request_ids == [1]


# ------------------------------------------------------------- random call sequences

_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["admit", "grow", "free", "cache", "checkpoint", "release", "adopt", "keep"]
        ),
        st.integers(0, 11),
        st.integers(1, 600),
    ),
    max_size=60,
)


def _cache_op(allocator: CacheAllocator, op: str, request_id: int, amount: int,
              tokens: dict[int, int], keys: dict[int, bool]) -> tuple[bool, object]:  # fmt: skip
    """The prefix cache's calls of `_replay` (``keys``: held key -> is a checkpoint):
    whether the op applied, and its result."""
    unit = allocator.kv_unit_tokens
    kv_keys = [k for k, is_checkpoint in keys.items() if not is_checkpoint]
    if op == "cache" and request_id in tokens and unit and tokens[request_id] >= unit:
        key = allocator.cache_kv_unit(request_id, amount % (tokens[request_id] // unit))
        keys[key] = False
        return True, key
    if op == "checkpoint" and allocator.geometry.recurrent_layers:
        key = allocator.cache_checkpoint()
        if key is not None:
            keys[key] = True
        return True, key
    if op == "keep" and request_id in tokens and allocator.geometry.recurrent_layers:
        key = allocator.free_keeping_slot(request_id)
        del tokens[request_id]
        keys[key] = True
        return True, key
    if op == "release" and keys:
        key = list(keys)[amount % len(keys)]
        del keys[key]
        return True, allocator.release_cached(key)
    adopted = kv_keys[: 1 + amount % 4]
    if op == "adopt" and request_id not in tokens and adopted:
        num_tokens = len(adopted) * unit + amount % unit + 1
        if allocator.fits_alone(num_tokens):
            result = allocator.admit(request_id, num_tokens, cached=adopted)
            if result is not None:
                tokens[request_id] = num_tokens
            return True, result
    return False, None


def _replay(allocator: CacheAllocator, ops: list[tuple[str, int, int]]) -> list[object]:
    """Drive the allocator, checking invariants and a token model after every call."""
    tokens: dict[int, int] = {}
    keys: dict[int, bool] = {}
    decisions: list[object] = []
    for op, request_id, amount in ops:
        live = request_id in tokens
        if op in ("cache", "checkpoint", "release", "adopt", "keep"):
            applied, result = _cache_op(allocator, op, request_id, amount, tokens, keys)
            if not applied:
                continue
        elif op == "admit" and not live and allocator.fits_alone(amount):
            result = allocator.admit(request_id, amount)
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
        assert allocator.cached_keys() == sorted(keys)
        usage = allocator.usage()
        assert usage.kv_used_bytes <= usage.kv_capacity_bytes
        assert usage.state_used_bytes <= usage.state_capacity_bytes
        assert usage.used_bytes >= usage.needed_bytes
        assert usage.unassigned_bytes >= 0
        assert usage.kv_cached_bytes <= usage.kv_used_bytes
        assert usage.state_cached_bytes <= usage.state_used_bytes
    return decisions


@settings(max_examples=60, deadline=None)
@given(
    ops=_OPS,
    layout=st.sampled_from(list(LAYOUTS)),
    num_attention=st.integers(0, 3),
    num_recurrent=st.integers(0, 5),
    budget_mib=st.integers(2, 6),
)
def test_random_sequences_keep_invariants_and_are_deterministic(
    ops: list[tuple[str, int, int]],
    layout: str,
    num_attention: int,
    num_recurrent: int,
    budget_mib: int,
) -> None:
    if num_attention + num_recurrent == 0:
        num_recurrent = 1
    if layout.startswith("unified") and num_attention > num_recurrent:
        num_recurrent = num_attention  # several vLLM attention groups: not placeable
    geometry = small_hybrid(num_attention, num_recurrent, d_inner=512)
    first = _replay(build(layout, budget_mib, geometry), ops)
    assert _replay(build(layout, budget_mib, geometry), ops) == first


def test_recent_frees_stay_bounded_and_forget_the_oldest() -> None:
    frees = RecentFrees(limit=3)
    for request_id in range(10):
        frees.add(request_id)
    assert len(frees) == 3 and 6 not in frees and all(i in frees for i in (7, 8, 9))
    frees.discard(8)  # admitted again
    frees.add(10)
    frees.add(8)  # freed again: the stale entry for 8 must not evict the new one
    frees.add(11)
    assert 8 in frees and 7 not in frees and len(frees) <= 3


@every_layout
@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 900), min_size=1, max_size=40))
def test_could_hold_says_yes_only_when_the_requests_fit(layout: str, lengths: list[int]) -> None:
    """`could_hold` is what admission reserves against: it says the requests fit together
    exactly when admitting them one by one into an empty memory succeeds, and it never
    says no about requests that are all live."""
    allocator = build(layout, budget_mib=8)
    units = sum(allocator.kv_units_for(n) for n in lengths)
    says = allocator.could_hold(len(lengths), units)
    admitted = 0
    for request_id, num_tokens in enumerate(lengths):
        try:
            if allocator.admit(request_id, num_tokens) is None:
                break
        except RequestTooLargeError:
            break
        admitted += 1
    allocator.check_integrity()
    assert says == (admitted == len(lengths))
    live = allocator.request_ids
    held = sum(allocator.kv_units_for(allocator.num_tokens(r)) for r in live)
    assert allocator.could_hold(len(live), held)


@every_layout
def test_kv_units_follow_the_layouts_unit(layout: str) -> None:
    allocator = build(layout)
    unit = allocator.kv_unit_tokens
    assert unit >= allocator.config.block_size
    assert allocator.kv_units_for(1) == 1 and allocator.kv_units_for(unit) == 1
    assert allocator.kv_units_for(unit + 1) == 2
