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
# SGLang's static split as it ships (sglang/srt/.../kv_cache_configurator.py, its
# scheduler with the radix cache on): options of the static layout, each off by default.
STATIC_SHIPPED_OPTIONS = ("padding_slot", "give_back", "radix_cache_cap")


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
        options: for ``static`` only: ``state_fraction`` or ``mamba_full_memory_ratio``
            (default: SGLang's ratio 0.9), and SGLang's behaviour as it ships, each off
            by default (the published figures were made without them): ``padding_slot``
            (one state slot held back), ``give_back`` (the state share's unused whole
            chunks go to the KV pool), ``radix_cache_cap`` (at most a third of the slots
            running at once, SGLang's cap with its radix cache on); ``sglang_defaults``
            turns on padding_slot and give_back together. No other layout takes options.
    Raises:
        ValueError: an unknown name (the message lists the known ones), an option the
            layout does not take, or a backing given to the oracle.
    """
    if name not in ALLOCATOR_NAMES:
        raise ValueError(f"unknown allocator {name!r}; known: {', '.join(ALLOCATOR_NAMES)}")
    if name == "static":
        split, shipped = _split_options(options)
        fraction = static_state_fraction(geometry, **split)
        return AvmpManager(geometry, config, backing, fixed_state_fraction=fraction, **shipped)
    if options:
        raise ValueError(f"the {name} allocator takes no options, got {', '.join(options)}")
    if name == "avmp":
        return AvmpManager(geometry, config, backing)
    if name == "unified":
        return UnifiedAllocator(geometry, config, backing)
    if backing is not None:
        raise ValueError("the oracle allocator is bookkeeping only: it takes no backing")
    return OracleAllocator(geometry, config)


def _split_options(options: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, bool]]:
    """The static layout's options: its split, and which of SGLang's shipped behaviours
    (`STATIC_SHIPPED_OPTIONS`) are on."""
    unknown = set(options) - {"state_fraction", "mamba_full_memory_ratio", "sglang_defaults",
                              *STATIC_SHIPPED_OPTIONS}
    if unknown:
        raise ValueError(
            f"the static allocator takes state_fraction, mamba_full_memory_ratio, "
            f"sglang_defaults, {', '.join(STATIC_SHIPPED_OPTIONS)}; "
            f"got {', '.join(sorted(unknown))}"
        )
    for key in ("sglang_defaults", *STATIC_SHIPPED_OPTIONS):
        if key in options and not isinstance(options[key], bool):
            raise ValueError(f"the static option {key} must be True or False, "
                             f"got {options[key]!r}")
    shipped = {key: bool(options.get(key, False)) for key in STATIC_SHIPPED_OPTIONS}
    if options.get("sglang_defaults"):
        shipped["padding_slot"] = shipped["give_back"] = True
    split = {"state_fraction": options.get("state_fraction"),
             "mamba_full_memory_ratio": options.get("mamba_full_memory_ratio")}
    return split, shipped


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
