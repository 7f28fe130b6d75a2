"""Allocators by name: one implementation per layout, options checked."""

from __future__ import annotations

import pytest
from hybrid_geometries import small_hybrid

from avmp.memory.backing.host import HostBacking
from avmp.memory.manager import AvmpManager
from avmp.memory.oracle import OracleAllocator
from avmp.memory.registry import ALLOCATOR_NAMES, make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.memory.unified import UnifiedAllocator

MiB = 1 << 20
CLASSES = {"avmp": AvmpManager, "static": AvmpManager, "unified": UnifiedAllocator,
           "oracle": OracleAllocator}  # fmt: skip


@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
def test_registry_builds_every_layout_by_name(name: str) -> None:
    allocator = make_allocator(name, small_hybrid(), MemoryConfig(4 * MiB))
    assert allocator.name == name and type(allocator) is CLASSES[name]
    assert allocator.admit(0, 10) is not None


def test_registry_passes_the_static_split() -> None:
    allocator = make_allocator("static", small_hybrid(), MemoryConfig(8 * MiB), state_fraction=0.25)
    assert isinstance(allocator, AvmpManager) and allocator.fixed_state_fraction == 0.25


def test_registry_rejects_unknown_names_options_and_a_backed_oracle() -> None:
    config = MemoryConfig(2 * MiB)
    with pytest.raises(ValueError, match="known: avmp, unified, static, oracle"):
        make_allocator("paged", small_hybrid(), config)
    with pytest.raises(ValueError, match="takes no options"):
        make_allocator("avmp", small_hybrid(), config, state_fraction=0.5)
    with pytest.raises(ValueError, match="bookkeeping only"):
        make_allocator("oracle", small_hybrid(), config, HostBacking())


def test_registry_hands_the_backing_to_the_layout() -> None:
    backing = HostBacking()
    allocator = make_allocator("avmp", small_hybrid(), MemoryConfig(4 * MiB), backing)
    assert isinstance(allocator, AvmpManager) and allocator.backing is backing
