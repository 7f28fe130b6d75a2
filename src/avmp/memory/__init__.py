"""Cache allocators for hybrid models: one implementation per layout (AVMP, its static
split, vLLM's unified pool, the oracle), all behind `avmp.memory.spec.CacheAllocator`
and built by name with `make_allocator`. No torch import here."""

from __future__ import annotations

from avmp.memory.manager import AvmpManager
from avmp.memory.migration import MemoryEvent
from avmp.memory.oracle import OracleAllocator
from avmp.memory.registry import ALLOCATOR_NAMES, make_allocator
from avmp.memory.unified import UnifiedAllocator

__all__ = [
    "ALLOCATOR_NAMES",
    "AvmpManager",
    "MemoryEvent",
    "OracleAllocator",
    "UnifiedAllocator",
    "make_allocator",
]
