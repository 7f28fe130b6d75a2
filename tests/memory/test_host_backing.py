"""The host backing: the shared backing contract plus its own misuse checks."""

from __future__ import annotations

import pytest
from backing_contract import BackingContract, unit_pattern

from avmp.memory.backing import BackingError, HostBacking
from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind

MiB = 1 << 20
SPEC = CacheSpec(page_bytes=3 * MiB // 2, slot_bytes=3 * MiB, block_size=16,
                 kv_bytes_per_token=3 * MiB // 32)


class TestHostBackingContract(BackingContract):
    make_backing = staticmethod(HostBacking)


def attached(num_chunks: int = 4) -> HostBacking:
    backing = HostBacking()
    backing.attach(SPEC, MemoryConfig(budget_bytes=num_chunks * 2 * MiB))
    return backing


def test_calls_before_attach_are_refused() -> None:
    backing = HostBacking()
    with pytest.raises(BackingError):
        backing.map_chunks(PoolKind.KV, [0])
    with pytest.raises(BackingError):
        backing.read_unit(PoolKind.KV, 0)


def test_attach_only_once() -> None:
    backing = attached()
    with pytest.raises(BackingError):
        backing.attach(SPEC, MemoryConfig(budget_bytes=4 * MiB))


def test_units_beyond_the_mapped_range_are_refused() -> None:
    backing = attached()
    backing.map_chunks(PoolKind.KV, [0, 1])  # 4 MiB: pages 0 and 1 whole, page 2 not
    backing.write_unit(PoolKind.KV, 1, unit_pattern(1, 3 * MiB // 2))
    for index in (2, -1):
        with pytest.raises(BackingError):
            backing.read_unit(PoolKind.KV, index)
    with pytest.raises(BackingError):
        backing.copy_units(PoolKind.KV, [(1, 2)])
    with pytest.raises(BackingError):
        backing.read_unit(PoolKind.STATE, 0)


def test_write_must_fill_exactly_one_unit() -> None:
    backing = attached()
    backing.map_chunks(PoolKind.STATE, [2, 3])
    with pytest.raises(BackingError):
        backing.write_unit(PoolKind.STATE, 0, b"short")


def test_map_refuses_unknown_chunks_and_maps_nothing() -> None:
    backing = attached()
    with pytest.raises(BackingError):
        backing.map_chunks(PoolKind.KV, [1, 7])
    with pytest.raises(BackingError):
        backing.map_chunks(PoolKind.KV, [1, 1])
    assert backing.mapped_chunks(PoolKind.KV) == []


def test_close_is_idempotent() -> None:
    backing = attached()
    backing.map_chunks(PoolKind.KV, [0])
    backing.close()
    backing.close()
    assert backing.mapped_chunks(PoolKind.KV) == []
