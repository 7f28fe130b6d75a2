"""What every allocator shares: its configuration, unit sizes, errors, usage and stats,
and the `CacheAllocator` interface that the simulator and the engine program against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from avmp.models.geometry import ModelGeometry
from avmp.units import ceil_div

if TYPE_CHECKING:
    from avmp.memory.backing.unit_format import CacheFormat

CHUNK_GRANULARITY_BYTES = 2 << 20  # CUDA VMM minimum granularity on current GPUs
NO_SLOT = -1  # `RequestUnits.slot` of a model without recurrent layers
# AVMP's migration policies (`avmp.memory.migration`): "streak" sizes a migration's extra
# chunks from the recipient's recent demand; "eager" is the policy before it, kept to
# compare against (exactly the shortfall plus `migration_batch_chunks`, every time).
MIGRATION_POLICIES = ("streak", "eager")


class PoolKind(StrEnum):
    """The two pools of a hybrid cache."""

    KV = "kv"
    STATE = "state"

    @property
    def other(self) -> PoolKind:
        return PoolKind.STATE if self is PoolKind.KV else PoolKind.KV


@dataclass(frozen=True)
class MemoryConfig:
    """How much memory the caches get and how it is cut.

    Attributes:
        budget_bytes: all cache memory (both pools), in bytes.
        chunk_bytes: the unit of physical capacity that moves between pools.
        block_size: tokens per KV page.
        migration_batch_chunks: chunks migrated beyond the demand, so a run of
            failures in one pool costs one migration instead of many.
        migration_policy: one of `MIGRATION_POLICIES`: how many free chunks beyond
            the demand a migration moves (it never changes whether an allocation fits).
    """

    budget_bytes: int
    chunk_bytes: int = CHUNK_GRANULARITY_BYTES
    block_size: int = 16
    migration_batch_chunks: int = 0
    migration_policy: str = "streak"

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.chunk_bytes % CHUNK_GRANULARITY_BYTES:
            raise ValueError(
                "chunk_bytes must be a positive multiple of 2 MiB (CUDA VMM granularity)"
            )
        if self.budget_bytes < self.chunk_bytes:
            raise ValueError(
                f"budget_bytes ({self.budget_bytes}) must hold at least one chunk "
                f"({self.chunk_bytes})"
            )
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.migration_batch_chunks < 0:
            raise ValueError("migration_batch_chunks must be >= 0")
        if self.migration_policy not in MIGRATION_POLICIES:
            raise ValueError(
                f"unknown migration_policy {self.migration_policy!r}; "
                f"known: {', '.join(MIGRATION_POLICIES)}"
            )

    @property
    def num_chunks(self) -> int:
        """Whole chunks in the budget; a remainder smaller than a chunk is never used."""
        return self.budget_bytes // self.chunk_bytes


@dataclass(frozen=True)
class CacheSpec:
    """Exact unit sizes of one model's two pools.

    A page holds ``block_size`` tokens of K and V for every attention layer; a slot holds
    one request's whole recurrent state. A model without attention has ``page_bytes == 0``
    and never asks for pages.
    """

    page_bytes: int
    slot_bytes: int
    block_size: int
    kv_bytes_per_token: int

    @classmethod
    def from_geometry(cls, geometry: ModelGeometry, block_size: int = 16) -> CacheSpec:
        return cls(
            page_bytes=block_size * geometry.kv_bytes_per_token,
            slot_bytes=geometry.state_bytes_per_request,
            block_size=block_size,
            kv_bytes_per_token=geometry.kv_bytes_per_token,
        )

    def num_pages_for(self, num_tokens: int) -> int:
        """Pages that ``num_tokens`` tokens occupy (0 for a model without attention)."""
        if self.page_bytes == 0:
            return 0
        return ceil_div(num_tokens, self.block_size)

    def unit_bytes(self, pool: PoolKind) -> int:
        return self.page_bytes if pool is PoolKind.KV else self.slot_bytes


class AllocatorError(Exception):
    """Misuse of an allocator (not running out of memory, which is a return value)."""


class UnknownRequestError(AllocatorError, KeyError):
    """A request id the allocator does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateRequestError(AllocatorError):
    """A request id admitted while it is still live."""


class DoubleFreeError(UnknownRequestError):
    """A request freed twice in a row: the id is not live, and was freed recently
    enough to be remembered (see `avmp.memory.requests.RecentFrees`)."""


class RequestTooLargeError(AllocatorError):
    """A request that could not fit even in an empty memory."""


@dataclass(frozen=True)
class RequestUnits:
    """Where one request's cache lives right now: its slot and its pages in token order.

    Indices are physical unit positions inside each pool; compaction may change them
    (read `CacheAllocator.placement_epoch` to know when to refresh).
    """

    slot: int
    pages: tuple[int, ...]


@dataclass(frozen=True)
class MemoryUsage:
    """A snapshot of how the budget is used.

    ``*_capacity_bytes``: bytes backing each pool (the chunks each pool owns for AVMP and
    its static split; for unified, the blocks holding state and the rest; for the
    oracle, what is used). ``*_used_bytes``: bytes of units handed out, padding
    included. ``*_needed_bytes``: the exact bytes the live requests need (a KV unit
    that a request adopted from the prefix cache counts for its first holder only).
    ``*_cached_bytes``: units that only the prefix cache holds (KV units no live request
    holds, checkpoint slots): reclaimable by evicting them, counted in ``*_used_bytes``.
    """

    budget_bytes: int
    kv_capacity_bytes: int
    state_capacity_bytes: int
    kv_used_bytes: int
    state_used_bytes: int
    kv_needed_bytes: int
    state_needed_bytes: int
    num_requests: int
    num_pages_used: int
    num_slots_used: int
    kv_cached_bytes: int = 0
    state_cached_bytes: int = 0

    @property
    def used_bytes(self) -> int:
        return self.kv_used_bytes + self.state_used_bytes

    @property
    def needed_bytes(self) -> int:
        return self.kv_needed_bytes + self.state_needed_bytes

    @property
    def unassigned_bytes(self) -> int:
        return self.budget_bytes - self.kv_capacity_bytes - self.state_capacity_bytes


@dataclass
class AllocatorStats:
    """Counters an allocator keeps over its lifetime (what the time model charges for)."""

    num_admits: int = 0
    num_grows: int = 0
    num_frees: int = 0
    num_oom_events: int = 0
    num_migrations: int = 0
    num_chunks_migrated: int = 0
    num_compactions: int = 0
    num_units_moved: int = 0
    num_bytes_compacted: int = 0
    chunks_migrated_to: dict[str, int] = field(default_factory=lambda: {"kv": 0, "state": 0})


class CacheAllocator(ABC):
    """The interface every layout implements: AVMP and the baselines alike.

    Running out of memory is a return value (`None`); misuse raises an `AllocatorError`
    (a wrong id or request size), a TypeError (an id or token count that is not an int)
    or a ValueError (a token count below 1). A failed call changes nothing. The same
    sequence of calls gives the same decisions.
    """

    name: str = "allocator"

    def __init__(self, geometry: ModelGeometry, config: MemoryConfig) -> None:
        self.geometry = geometry
        self.config = config
        self.stats = AllocatorStats()

    @abstractmethod
    def admit(
        self, request_id: int, num_tokens: int, cached: Sequence[int] = ()
    ) -> RequestUnits | None:
        """Give a new request its state slot and the pages for its first ``num_tokens``.

        ``cached``: keys of KV units the prefix cache holds (`cache_kv_unit`), which
        become the request's first units, shared read-only; the rest are new. Their
        tokens count in ``num_tokens``.

        Returns:
            Where the request's cache lives, or None if memory is short now.
        Raises:
            TypeError: the id or ``num_tokens`` is not an int.
            ValueError: ``num_tokens`` < 1.
            DuplicateRequestError: the id is live.
            RequestTooLargeError: ``num_tokens`` could not fit even in an empty memory.
            AllocatorError: a cached key not held, on a checkpoint, or more cached units
                than ``num_tokens`` fill.
        """

    @abstractmethod
    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        """Extend a live request by ``num_new_tokens`` tokens.

        Returns:
            Indices of the pages added (possibly none), or None if memory is short now.
        Raises:
            TypeError: the id or ``num_new_tokens`` is not an int.
            ValueError: ``num_new_tokens`` < 1.
            UnknownRequestError: the request is not live.
            RequestTooLargeError: the grown request could not fit even in empty memory.
        """

    @abstractmethod
    def free(self, request_id: int) -> None:
        """Release every unit of a request.

        Raises:
            UnknownRequestError: the request is not live (never admitted, or freed:
                a `DoubleFreeError` when the free was recent).
        """

    # -- the prefix cache's units (`avmp.memory.cached`) -----------------------------
    # Every layout of `avmp.memory.registry` implements these; the defaults refuse, for
    # stand-ins (tests, wrappers) that never cache.

    def cache_kv_unit(self, request_id: int, index: int) -> int:
        """Let the prefix cache hold a live request's ``index``-th KV unit (of
        `kv_unit_tokens` tokens, which the request must hold in full): one more holder,
        so the unit outlives the request until the cache releases it.

        Returns:
            The key, stable across compaction.
        Raises:
            UnknownRequestError: the request is not live.
            AllocatorError: ``index`` is not one of the request's full KV units.
        """
        raise AllocatorError(f"the {self.name} allocator keeps no prefix cache")

    def cache_checkpoint(self) -> int | None:
        """A new state slot that only the prefix cache holds, for a checkpoint (an exact
        slot in AVMP and static, a padded state run in unified: vLLM's cost).

        Returns:
            Its key, or None if memory is short now (counted as an OOM event).
        Raises:
            AllocatorError: the model has no recurrent state.
        """
        raise AllocatorError(f"the {self.name} allocator keeps no prefix cache")

    def free_keeping_slot(self, request_id: int) -> int:
        """Free a live request like `free`, except its slot, which becomes a checkpoint
        only the prefix cache holds: the request's final state, kept without a copy.

        Returns:
            The checkpoint's key.
        Raises:
            UnknownRequestError: the request is not live.
            AllocatorError: the model has no recurrent state.
        """
        raise AllocatorError(f"the {self.name} allocator keeps no prefix cache")

    def release_cached(self, key: int) -> None:
        """Drop the cache's hold on ``key``; its unit is freed once nobody holds it.

        Raises:
            AllocatorError: the key is not held.
        """
        raise AllocatorError(f"cache key {key} is not held")

    def cached_unit(self, key: int) -> int:
        """Where a cached unit lives now: a KV unit index (`units` lists kernel pages of
        it for the unified layout) or a checkpoint's slot."""
        raise AllocatorError(f"cache key {key} is not held")

    def cached_keys(self) -> list[int]:
        """Every key the prefix cache holds, oldest first."""
        return []

    @abstractmethod
    def units(self, request_id: int) -> RequestUnits:
        """Where a live request's cache lives now (raises UnknownRequestError)."""

    @abstractmethod
    def num_tokens(self, request_id: int) -> int:
        """Tokens a live request holds (raises UnknownRequestError)."""

    @abstractmethod
    def fits_alone(self, num_tokens: int) -> bool:
        """Whether one request of ``num_tokens`` tokens fits in an empty memory."""

    @property
    def kv_unit_tokens(self) -> int:
        """Tokens one KV unit of this layout holds (its page; vLLM's attention block for
        the unified pool), 0 for a model without attention. With `could_hold`, what the
        scheduler needs to reserve room for requests' growth before admitting more."""
        return self.config.block_size if self.geometry.kv_bytes_per_token else 0

    def kv_units_for(self, num_tokens: int) -> int:
        """KV units that one request of ``num_tokens`` tokens holds."""
        unit = self.kv_unit_tokens
        return ceil_div(num_tokens, unit) if unit else 0

    @abstractmethod
    def could_hold(self, num_requests: int, num_kv_units: int) -> bool:
        """Whether ``num_requests`` requests holding ``num_kv_units`` KV units between them
        (see `kv_units_for`) would fit in this memory at once, wherever the requests are
        now: capacity that may migrate counts, fragmentation that compaction removes does
        not, and the layout's own limits (a fixed split, a running cap) apply."""

    @abstractmethod
    def usage(self) -> MemoryUsage:
        """A snapshot of capacity and use."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant is broken."""

    def cache_format(self) -> CacheFormat:
        """The byte format of this layout's page and slot, for a tensor backing's views
        (pages of ``config.block_size`` tokens and exact slots unless a layout pads)."""
        # imported here: unit_format imports this module for CacheSpec and PoolKind
        from avmp.memory.backing.unit_format import CacheFormat

        return CacheFormat.from_geometry(self.geometry, self.config.block_size)

    @property
    def placement_epoch(self) -> int:
        """Bumped whenever live units move (compaction); block tables read before a
        change of epoch are stale."""
        return 0

    @property
    @abstractmethod
    def request_ids(self) -> list[int]:
        """Live requests, in admission order."""
