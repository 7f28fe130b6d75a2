"""Cache allocators for hybrid models: the AVMP manager and the baselines it is compared
with, all behind `avmp.memory.spec.CacheAllocator`. No torch import here."""

from __future__ import annotations

from avmp.memory.manager import AvmpManager
from avmp.memory.migration import MemoryEvent

__all__ = ["AvmpManager", "MemoryEvent"]
