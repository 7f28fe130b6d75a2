"""Allocators by name, so the planner, the simulator, the CLI and the engine build them
the same way: one implementation per layout, with or without a backing."""

from __future__ import annotations

from typing import Any

from avmp.memory.backing.base import Backing
from avmp.memory.manager import AvmpManager
from avmp.memory.oracle import OracleAllocator
from avmp.memory.spec import CacheAllocator, MemoryConfig
from avmp.memory.unified import UnifiedAllocator
from avmp.models.geometry import ModelGeometry

ALLOCATOR_NAMES = ("avmp", "unified", "static", "oracle")
SGLANG_MAMBA_FULL_MEMORY_RATIO = 0.9  # SGLang's default --mamba-full-memory-ratio


def make_allocator(
    name: str,
    geometry: ModelGeometry,
    config: MemoryConfig,
    backing: Backing | None = None,
    **options: Any,
) -> CacheAllocator:
    """Build the allocator called ``name`` for one model and budget.

    Args:
        name: one of `ALLOCATOR_NAMES`: ``avmp``; ``static`` (the AVMP manager with
            SGLang's split fixed at start-up); ``unified`` (vLLM's padded block pool);
            ``oracle`` (exact bytes, bookkeeping only).
        backing: where the bytes live (None: bookkeeping only). The unified layout
            needs one buffer of `avmp.memory.unified.unified_buffer_bytes`.
        options: ``state_fraction`` or ``mamba_full_memory_ratio`` for ``static``
            (default: SGLang's ratio 0.9); no other layout takes options.
    Raises:
        ValueError: an unknown name (the message lists the known ones), an option the
            layout does not take, or a backing given to the oracle.
    """
    if name not in ALLOCATOR_NAMES:
        raise ValueError(f"unknown allocator {name!r}; known: {', '.join(ALLOCATOR_NAMES)}")
    if name == "static":
        fraction = static_state_fraction(geometry, **_split_options(options))
        return AvmpManager(geometry, config, backing, fixed_state_fraction=fraction)
    if options:
        raise ValueError(f"the {name} allocator takes no options, got {', '.join(options)}")
    if name == "avmp":
        return AvmpManager(geometry, config, backing)
    if name == "unified":
        return UnifiedAllocator(geometry, config, backing)
    if backing is not None:
        raise ValueError("the oracle allocator is bookkeeping only: it takes no backing")
    return OracleAllocator(geometry, config)


def _split_options(options: dict[str, Any]) -> dict[str, float | None]:
    unknown = set(options) - {"state_fraction", "mamba_full_memory_ratio"}
    if unknown:
        raise ValueError(
            f"the static allocator takes state_fraction or mamba_full_memory_ratio, "
            f"got {', '.join(sorted(unknown))}"
        )
    return {"state_fraction": options.get("state_fraction"),
            "mamba_full_memory_ratio": options.get("mamba_full_memory_ratio")}


def static_state_fraction(
    geometry: ModelGeometry,
    state_fraction: float | None = None,
    mamba_full_memory_ratio: float | None = None,
) -> float:
    """The share of the budget SGLang gives the state pool.

    ``state_fraction`` F is used as given; SGLang's ``mamba_full_memory_ratio`` r means
    r / (1 + r) (default r = 0.9, about 47%). A model with only one kind of cache gives
    it the whole budget, since the other pool would never be used.

    Raises:
        ValueError: both were given, or either is out of range.
    """
    if state_fraction is not None and mamba_full_memory_ratio is not None:
        raise ValueError("give state_fraction or mamba_full_memory_ratio, not both")
    if state_fraction is not None and not 0.0 < state_fraction < 1.0:
        raise ValueError(f"state_fraction must be in (0, 1), got {state_fraction}")
    if mamba_full_memory_ratio is not None and not mamba_full_memory_ratio > 0.0:
        raise ValueError(f"mamba_full_memory_ratio must be > 0, got {mamba_full_memory_ratio}")
    if not geometry.recurrent_layers:
        return 0.0
    if not geometry.attention_layers:
        return 1.0
    if state_fraction is not None:
        return state_fraction
    ratio = mamba_full_memory_ratio
    if ratio is None:
        ratio = SGLANG_MAMBA_FULL_MEMORY_RATIO
    return ratio / (1.0 + ratio)
