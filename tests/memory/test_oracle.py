"""The oracle layout: exact bytes, free and instant migration; the reference."""

from __future__ import annotations

import pytest
from hybrid_geometries import fill, jamba_mini, small_hybrid

from avmp.memory.oracle import OracleAllocator
from avmp.memory.registry import ALLOCATOR_NAMES, make_allocator
from avmp.memory.spec import MemoryConfig

MiB = 1 << 20
GiB = 1 << 30



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
def test_oracle_holds_at_least_as_many_as_any_layout(num_tokens: int) -> None:
    geometry, config = jamba_mini(), MemoryConfig(4 * GiB)
    oracle = fill(OracleAllocator(geometry, config), num_tokens)
    for name in ALLOCATOR_NAMES:
        assert oracle >= fill(make_allocator(name, geometry, config), num_tokens), name
