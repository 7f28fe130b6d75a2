"""The static layout: the AVMP manager with SGLang's split fixed at start-up
(`fixed_state_fraction`), nothing migrating afterwards."""

from __future__ import annotations

import pytest
from hybrid_geometries import fill, jamba_mini, pure_attention, pure_recurrent, small_hybrid

from avmp.memory.address_space import units_for_chunks
from avmp.memory.backing.host import HostBacking
from avmp.memory.manager import AvmpManager
from avmp.memory.registry import make_allocator, static_state_fraction
from avmp.memory.spec import MemoryConfig, PoolKind, RequestTooLargeError

MiB = 1 << 20
GiB = 1 << 30
KV, STATE = PoolKind.KV, PoolKind.STATE



def static(geometry: object, budget: int, **options: float) -> AvmpManager:
    allocator = make_allocator("static", geometry, MemoryConfig(budget), **options)  # type: ignore[arg-type]
    assert isinstance(allocator, AvmpManager) and allocator.name == "static"
    return allocator


def test_static_split_follows_sglang_ratio_in_whole_chunks() -> None:
    geometry = jamba_mini()
    assert static_state_fraction(geometry) == pytest.approx(0.9 / 1.9)
    assert static_state_fraction(geometry, mamba_full_memory_ratio=1.0) == 0.5
    assert static_state_fraction(geometry, state_fraction=0.3) == 0.3
    allocator = static(geometry, 12 * GiB)
    chunks = 12 * GiB // (2 * MiB)
    state_chunks = round(chunks * 0.9 / 1.9)
    slot, page = geometry.state_bytes_per_request, 16 * geometry.kv_bytes_per_token
    assert allocator.num_units(STATE) == units_for_chunks(state_chunks, slot, 2 * MiB)
    assert allocator.num_units(KV) == units_for_chunks(chunks - state_chunks, page, 2 * MiB)
    exact_slots = int(12 * GiB * 0.9 / 1.9) // slot  # SGLang's byte-exact split
    assert exact_slots - 1 <= allocator.num_units(STATE) <= exact_slots + 1


@pytest.mark.parametrize(
    "options",
    [
        {"state_fraction": 0.0},
        {"state_fraction": 1.0},
        {"mamba_full_memory_ratio": 0.0},
        {"state_fraction": 0.5, "mamba_full_memory_ratio": 1.0},
        {"ratio": 0.5},
    ],
)
def test_static_rejects_bad_split(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        static(jamba_mini(), 1 * GiB, **options)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_manager_rejects_a_fixed_fraction_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match="fixed_state_fraction"):
        AvmpManager(jamba_mini(), MemoryConfig(1 * GiB), fixed_state_fraction=fraction)


def test_static_split_never_migrates_and_refuses_when_its_pool_is_full() -> None:
    geometry = small_hybrid(2, 6, d_inner=512)
    manager = AvmpManager(geometry, MemoryConfig(8 * MiB), HostBacking(), fixed_state_fraction=0.25)
    assert manager.name == "static"
    assert len(manager.pool_chunks(STATE)) == 1  # 25% of 4 chunks
    assert len(manager.pool_chunks(KV)) == 3 and manager.reserve_chunks() == []
    slots = manager.num_units(STATE)
    for request_id in range(slots):
        assert manager.admit(request_id, 1) is not None
    assert manager.num_free_units(KV) > 0
    assert manager.admit(slots, 1) is None  # KV is free, but the state pool is full
    assert manager.stats.num_oom_events == 1
    assert manager.stats.num_migrations == 0 and manager.events == []
    manager.check_integrity()


def test_static_full_kv_pool_stops_admission_while_slots_are_free() -> None:
    allocator = static(jamba_mini(), 1 * GiB, state_fraction=0.9)
    admitted = fill(allocator, 4096)
    assert admitted == allocator.num_units(KV) // 256 < allocator.num_units(STATE)
    assert allocator.usage().num_pages_used == admitted * 256


def test_static_single_kind_models_give_the_whole_budget_to_it() -> None:
    assert static_state_fraction(pure_recurrent()) == 1.0
    assert static_state_fraction(pure_attention()) == 0.0
    allocator = static(pure_recurrent(), 64 * MiB)
    assert allocator.num_units(KV) == 0 and fill(allocator, 100) == allocator.num_units(STATE)
    allocator = static(pure_attention(), 64 * MiB)
    assert allocator.pool_chunks(STATE) == [] and fill(allocator, 16) == allocator.num_units(KV)


def test_static_split_too_small_for_one_slot_rejects_everything() -> None:
    manager = static(small_hybrid(2, 6, d_inner=512), 4 * MiB, state_fraction=0.01)
    assert manager.num_units(STATE) == 0
    assert not manager.fits_alone(1)
    with pytest.raises(RequestTooLargeError):
        manager.admit(0, 1)


# -- SGLang's static split as it ships: padding slot, give-back, running cap ---------


def test_padding_slot_is_held_and_never_handed_out() -> None:
    geometry = small_hybrid()
    plain, padded = static(geometry, 64 * MiB), static(geometry, 64 * MiB, padding_slot=True)
    assert padded.num_units(STATE) == plain.num_units(STATE)
    assert padded.num_free_units(STATE) == plain.num_free_units(STATE) - 1
    num_padded = fill(padded, 1)
    assert padded.padding_slot_id == 0
    assert 0 not in {padded.units(i).slot for i in range(num_padded)}
    assert num_padded == fill(plain, 1) - 1


def test_give_back_moves_the_state_share_beyond_whole_slots_to_kv() -> None:
    geometry = jamba_mini()
    plain, given = static(geometry, 8 * GiB), static(geometry, 8 * GiB, give_back=True)
    assert given.num_units(STATE) == plain.num_units(STATE)  # not one slot fewer
    state_chunks = len(given.pool_chunks(STATE))
    assert state_chunks == given._state.chunks_for(plain.num_units(STATE))
    given_chunks = len(plain.pool_chunks(STATE)) - state_chunks
    assert 0 < given_chunks * 2 * MiB < geometry.state_bytes_per_request
    assert len(given.pool_chunks(KV)) == len(plain.pool_chunks(KV)) + given_chunks
    assert given.num_units(KV) > plain.num_units(KV)


def test_radix_cache_cap_runs_a_third_of_the_slots_and_waits_without_oom() -> None:
    geometry = small_hybrid()
    capped = static(geometry, 64 * MiB, radix_cache_cap=True, padding_slot=True)
    assert capped.max_running == max(1, capped.num_free_units(STATE) // 3)
    assert fill(capped, 1) == capped.max_running
    assert capped.stats.num_oom_events == 0
    capped.free(0)
    assert capped.admit(10_000, 1) is not None


def test_sglang_defaults_turn_on_padding_and_give_back() -> None:
    allocator = static(jamba_mini(), 8 * GiB, sglang_defaults=True)
    assert allocator.padding_slot_id == 0 and allocator.max_running is None
    assert len(allocator.pool_chunks(STATE)) < len(static(jamba_mini(), 8 * GiB).pool_chunks(STATE))


@pytest.mark.parametrize("option", ["padding_slot", "give_back", "radix_cache_cap"])
def test_shipped_options_are_static_only_and_boolean(option: str) -> None:
    with pytest.raises(ValueError, match="takes no options"):
        make_allocator("avmp", small_hybrid(), MemoryConfig(8 * MiB), **{option: True})
    with pytest.raises(ValueError, match="need fixed_state_fraction"):
        AvmpManager(small_hybrid(), MemoryConfig(8 * MiB), **{option: True})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="True or False"):
        make_allocator("static", small_hybrid(), MemoryConfig(8 * MiB), **{option: 1})


def test_shipped_options_on_models_with_one_cache_kind() -> None:
    attention = static(pure_attention(), 8 * MiB, sglang_defaults=True, radix_cache_cap=True)
    assert attention.padding_slot_id == -1 and attention.max_running is None
    assert fill(attention, 16) > 0
    recurrent = static(pure_recurrent(), 64 * MiB, sglang_defaults=True)
    assert recurrent.padding_slot_id == 0 and fill(recurrent, 1) == recurrent.num_units(STATE) - 1
