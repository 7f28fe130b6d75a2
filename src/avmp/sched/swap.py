"""Preemption that keeps its work: the policy knobs, the cost rule and the copier
interface the scheduler uses to swap a preempted request out to the host tier and back.

A swapped-out request's bytes sit in one host extent (`avmp.memory.host_tier`) in this
order: its slot (when the model has recurrent layers), then its pages in token order,
each unit as the layout's `CacheFormat` lays it out (so an extent is
``slot_unit_bytes + len(pages) * page_unit_bytes`` bytes). On resume the request is
admitted for its cached tokens plus its next chunk; the copier writes the slot back and
the saved pages into the first pages of its new placement.

The cost rule, per victim: recomputing ``n`` cached tokens costs ``n`` times the prefill
time per token; swapping costs its bytes twice (out and back in) over the host link.
So recompute wins for short contexts (a slot of megabytes costs more to move than a few
tokens cost to prefill) and swap for long ones; the crossover comes from the two measured
rates, `PreemptionCosts.crossover_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

from avmp.memory.host_tier import HostExtent
from avmp.memory.spec import RequestUnits


class PreemptionMode(StrEnum):
    """How a preempted request gives its memory back.

    ``recompute``: drop its cache and compute it again (vLLM v1's only mode, SGLang's
    retraction). ``swap``: copy its units to the host tier whenever the tier has room.
    ``auto``: per victim, whichever the cost rule says is cheaper.
    """

    RECOMPUTE = "recompute"
    SWAP = "swap"
    AUTO = "auto"


class Admission(StrEnum):
    """When a waiting request may start (`avmp.sched.admission` has the rules).

    ``greedy``: whenever its first chunk fits now (vLLM v1). ``reserve``: only if the
    peak that the running requests and it will reach together, finishing at their own
    times, fits (ours). ``sglang``: only if every running request's remaining output,
    scaled by SGLang's decaying new-token ratio, fits beside it (SGLang as it ships).
    """

    GREEDY = "greedy"
    RESERVE = "reserve"
    SGLANG = "sglang"


_Choice = TypeVar("_Choice", PreemptionMode, Admission)


def parse_choice(kind: type[_Choice], name: str, value: str) -> _Choice:
    """``value`` as a member of ``kind``; a ValueError naming ``name`` and the choices."""
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(member.value for member in kind)
        raise ValueError(f"{name} must be one of {known}, got {value!r}") from None


# The default host tier, as a multiple of the cache budget: SGLang HiCache's default
# `--hicache-ratio 2`, host memory twice the device cache
# (docs.sglang.io/advanced_features/hicache_best_practices.html).
HOST_TIER_RATIO = 2

# SGLang's new-token-ratio schedule (python/sglang/global_config.py / environ defaults):
# the ratio starts at 0.7, decays linearly to 0.7 x 0.14 over 600 steps without a
# retraction, and after one is reset from what the running requests actually produced.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = INIT_NEW_TOKEN_RATIO * 0.14
NEW_TOKEN_RATIO_DECAY_STEPS = 600
RETRACT_DECODE_STEPS = 20  # SGLang: decode steps a retraction should buy, per request


@dataclass(frozen=True)
class PreemptionCosts:
    """The two rates the swap-or-recompute rule compares.

    Attributes:
        prefill_s_per_token: seconds the device spends per prompt token in a full
            prefill chunk (the time model's, or the engine's measured prefill speed).
        host_bytes_per_s: host <-> device copy bandwidth per direction (the GPU
            profile's host link, or the engine's measured pinned copy).
    """

    prefill_s_per_token: float
    host_bytes_per_s: float

    def __post_init__(self) -> None:
        if not self.prefill_s_per_token > 0:
            raise ValueError(f"prefill_s_per_token must be > 0, got {self.prefill_s_per_token}")
        if not self.host_bytes_per_s > 0:
            raise ValueError(f"host_bytes_per_s must be > 0, got {self.host_bytes_per_s}")

    def recompute_s(self, num_tokens: int) -> float:
        """Device time to compute ``num_tokens`` cached tokens again."""
        return num_tokens * self.prefill_s_per_token

    def swap_s(self, num_bytes: int) -> float:
        """Device time to copy ``num_bytes`` out and back in."""
        return 2 * num_bytes / self.host_bytes_per_s

    def crossover_tokens(self, slot_bytes: int, kv_bytes_per_token: int) -> float:
        """Cached tokens above which swapping beats recomputing (inf: never)."""
        per_token = self.prefill_s_per_token - 2 * kv_bytes_per_token / self.host_bytes_per_s
        if per_token <= 0:
            return float("inf")
        return 2 * slot_bytes / self.host_bytes_per_s / per_token


@dataclass(frozen=True, slots=True)
class SwapCopy:
    """One request's move to or from the host tier: its cached tokens and the bytes copied."""

    request_id: int
    num_tokens: int
    num_bytes: int


class Swapper(Protocol):
    """What carries out the copies (the engine's pinned host buffer); the simulator has
    none and charges the bytes to its clock.

    Both are called while the scheduler plans a step, before any later allocation of
    that step can reuse or move the units: `swap_out` before the victim's units are
    freed, `swap_in` right after the resumed request's units are allocated. A copier
    must order its copies after the device work already issued that touches those units
    and before any device work issued after the call.
    """

    def swap_out(self, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        """Copy ``units`` (slot first, then pages) into the host ``extent``."""

    def swap_in(self, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        """Copy the host ``extent`` back: the slot into ``units.slot`` and the saved
        pages into the first pages of ``units.pages``."""
