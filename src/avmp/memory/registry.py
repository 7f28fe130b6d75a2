"""Allocators by name, so the planner, the simulator and the CLI build them the same way."""

from __future__ import annotations

from typing import Any

from avmp.memory.baselines import OracleAllocator, StaticAllocator, UnifiedAllocator
from avmp.memory.manager import AvmpManager
from avmp.memory.spec import CacheAllocator, MemoryConfig
from avmp.models.geometry import ModelGeometry

ALLOCATOR_NAMES = ("avmp", "unified", "static", "oracle")

_ALLOCATORS: dict[str, type[CacheAllocator]] = {
    "avmp": AvmpManager,
    "unified": UnifiedAllocator,
    "static": StaticAllocator,
    "oracle": OracleAllocator,
}


def make_allocator(
    name: str, geometry: ModelGeometry, config: MemoryConfig, **options: Any
) -> CacheAllocator:
    """Build the allocator called ``name`` for one model and budget.

    Args:
        name: one of `ALLOCATOR_NAMES`.
        options: passed to the allocator's constructor (e.g. ``state_fraction`` for
            ``static``).
    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        cls = _ALLOCATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown allocator {name!r}; known: {', '.join(ALLOCATOR_NAMES)}"
        ) from None
    return cls(geometry, config, **options)
