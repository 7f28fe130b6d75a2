"""Cache allocators for hybrid models: the AVMP manager and the baselines it is compared
with, all behind `avmp.memory.spec.CacheAllocator`. No torch import here."""

from __future__ import annotations

from avmp.memory.baselines import OracleAllocator, StaticAllocator, UnifiedAllocator
from avmp.memory.manager import AvmpManager
from avmp.memory.migration import MemoryEvent
from avmp.memory.registry import ALLOCATOR_NAMES, make_allocator

__all__ = ["AvmpManager", "MemoryEvent"]
__all__ += [
    "ALLOCATOR_NAMES",
    "OracleAllocator",
    "StaticAllocator",
    "UnifiedAllocator",
    "make_allocator",
]
