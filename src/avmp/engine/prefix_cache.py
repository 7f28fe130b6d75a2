"""The engine's side of prefix caching (`avmp.sched.prefix` decides; this carries out).

The slot copier that takes and restores checkpoints on the device; the copies of the
host level (checkpoints evicted to the host tier and restored from it, through the
swapper's arena and copy stream); the policy given by name resolved for one model
(``vllm-align`` needs this model's vLLM block) and priced at this device's measured
speeds. Units are keyed by token ids through the scheduler's ``token_source``; the
engine passes its own token lists (`avmp.engine.engine.Engine`).

Ordering: every copy is issued on the device's current stream, the stream every step
runs on. The scheduler restores a hit while it plans the step that reads it, so the copy
is queued before that step's kernels; it takes a checkpoint while it finishes the step
that produced the state (after the step was launched, before the next is planned), so
the copy is queued after that step's kernels and before any later write to the slot.
Overlap changes when the host learns tokens, not the order of work on the stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace

import torch

from avmp.engine.host_tier import HostSwapper, synchronize
from avmp.memory.backing.device import TensorBacking
from avmp.memory.host_tier import HostExtent
from avmp.memory.spec import CacheAllocator, PoolKind, RequestUnits
from avmp.models.geometry import ModelGeometry
from avmp.sched.prefix import (
    PREFIX_CACHE_CHOICES,
    DeviceRates,
    PrefixCache,
    PrefixCacheConfig,
    prefill_flops,
    prefix_cache_config,
)
from avmp.sched.swap import PreemptionCosts
from avmp.units import format_bytes

COPY_PROBE_BYTES = 32 << 20  # a device copy long enough that launch cost is noise
COPY_PROBE_REPEATS = 3


class StateSlotCopier:
    """Copies one state slot's bytes into another (`avmp.sched.prefix.SlotCopier`): the
    whole slot, every recurrent layer's conv and SSM state, since a recurrent layer
    resumes from all of it. One device copy per call, queued on the current stream,
    with no wait for the host; not counted as compaction (the backing's own
    ``copy_units`` is)."""

    def __init__(self, backing: TensorBacking) -> None:
        self.backing = backing
        self.num_copies = 0
        self.num_bytes = 0

    def __call__(self, src: int, dst: int) -> None:
        backing = self.backing
        table = backing.unit_table(PoolKind.STATE)  # [max_slots, slot_unit_bytes] uint8
        row = table[backing.row_of(PoolKind.STATE, dst)]
        row.copy_(table[backing.row_of(PoolKind.STATE, src)], non_blocking=True)
        self.num_copies += 1
        self.num_bytes += row.numel()


class HostCheckpointCopies:
    """The host level's copies (`avmp.sched.prefix.HostCheckpointCopier`) through the
    engine's host tier: a checkpoint is a slot-only swap, so it takes the swapper's
    arena (at the extent the scheduler's `HostTier` handed out) and its copy stream,
    ordered after the device work issued so far and before any issued later."""

    def __init__(self, swapper: HostSwapper) -> None:
        self.swapper = swapper

    def to_host(self, slot: int, extent: HostExtent) -> None:
        self.swapper.swap_out(-1, RequestUnits(slot, ()), extent)

    def from_host(self, extent: HostExtent, slot: int) -> None:
        self.swapper.swap_in(-1, RequestUnits(slot, ()), extent)


def resolve_prefix_cache(
    choice: PrefixCacheConfig | str | None,
    geometry: ModelGeometry,
    block_size: int,
    rates: DeviceRates | None = None,
    host_level: bool = False,
) -> PrefixCacheConfig | None:
    """The prefix cache's config for this model: a config is taken as given; a name is
    resolved as the simulator resolves it (`avmp.sched.prefix.prefix_cache_config`),
    priced at ``rates`` (this device's, `device_rates`; None: the defaults), with the
    host tier as its second level when ``host_level`` (`EngineConfig.prefix_host_level`).

    Raises:
        ValueError: a name that is not one of `PREFIX_CACHE_CHOICES`.
    """
    if choice is None or isinstance(choice, PrefixCacheConfig):
        return choice
    check_prefix_choice(choice)
    return prefix_cache_config(choice, geometry, block_size, rates=rates, host_level=host_level)


def device_rates(geometry: ModelGeometry, costs: PreemptionCosts, chunk_tokens: int,
                 device: torch.device) -> DeviceRates:  # fmt: skip
    """The prefix cache's rates on this engine's device: the FLOP rate of the measured
    prefill (``costs.prefill_s_per_token`` over a chunk of ``chunk_tokens``), the
    measured host link, and a device-to-device copy for compaction (measured here);
    a chunk's remap keeps the default (CUDA VMM's 68 us; the torch backing moves the
    pools' boundary without a copy)."""
    flops = prefill_flops(geometry, chunk_tokens) / (chunk_tokens * costs.prefill_s_per_token)
    return DeviceRates(
        flops_per_s=flops,
        compaction_bytes_per_s=measure_device_copy_rate(device),
        host_bytes_per_s=costs.host_bytes_per_s,
    )


def measure_device_copy_rate(device: torch.device, num_bytes: int = COPY_PROBE_BYTES) -> float:
    """Bytes per second that one copy within ``device``'s memory moves (what a
    compaction's copies run at), timed after one untimed copy."""
    src = torch.zeros(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(COPY_PROBE_REPEATS):
        dst.copy_(src)
    synchronize(device)
    return COPY_PROBE_REPEATS * num_bytes / max(time.perf_counter() - start, 1e-9)


def check_room_for_checkpoint(allocator: CacheAllocator) -> None:
    """Refuse a prefix cache that could never keep a checkpoint: a memory that holds a
    request (its slot and a page) but not a checkpoint's slot beside it, so that every
    checkpoint would be refused or would evict itself (a model without recurrent state
    needs none).

    Raises:
        ValueError: one line with the slot's size and the budget.
    """
    geometry = allocator.geometry
    if not geometry.recurrent_layers or not allocator.could_hold(1, 1):
        return  # no state to checkpoint; or no request fits at all, cache or not
    if allocator.could_hold(2, 1):
        return
    slot_bytes = allocator.cache_format().slot.unit_bytes
    raise ValueError(
        f"prefix caching needs room for a checkpoint beside a request: {geometry.name}'s "
        f"state slot of {format_bytes(slot_bytes)} fits once beside a page in "
        f"{format_bytes(allocator.config.budget_bytes)} ({allocator.name} layout), not "
        "twice; give more memory or turn the prefix cache off"
    )


def check_prefix_choice(choice: object) -> None:
    """Raises ValueError (one line) unless ``choice`` names a prefix cache setting."""
    if choice not in PREFIX_CACHE_CHOICES:
        raise ValueError(
            f"prefix_cache must be one of {', '.join(PREFIX_CACHE_CHOICES)} or a "
            f"PrefixCacheConfig, got {choice!r}"
        )


@dataclass(frozen=True)
class PrefixCounts:
    """What a prefix cache has done since it was built, and what it holds now.

    Attributes:
        num_queried_tokens: prompt tokens of requests matched at their first admission.
        num_hit_tokens: of those, the tokens taken from the cache (not computed).
        num_hits: first admissions that took at least one token from the cache.
        num_checkpoints_taken: checkpoints taken (copies, and final states kept).
        num_evicted_pages: cached KV units evicted.
        num_evicted_checkpoints: checkpoints evicted from the device (some of them kept
            in the host level).
        num_checkpoints: checkpoints held now on the device.
        checkpoint_bytes: their bytes (a slot each; a padded state run in unified).
        num_pages: KV units the tree holds now (shared with live requests or not).
        num_host_stored: checkpoints copied out to the host level (`HostLevel`).
        num_host_hits: hits whose checkpoint was copied in from the host level.
        num_host_hit_tokens: the prompt tokens those hits took from the cache.
        host_bytes_out: bytes copied to the host level.
        host_bytes_in: bytes copied back from it.
        num_host_evicted: host checkpoints dropped (for a better one, for a swapped-out
            request, or with their pages).
        num_host_checkpoints: checkpoints held now in the host level.
        host_checkpoint_bytes: their bytes in the host tier.
    """

    num_queried_tokens: int = 0
    num_hit_tokens: int = 0
    num_hits: int = 0
    num_checkpoints_taken: int = 0
    num_evicted_pages: int = 0
    num_evicted_checkpoints: int = 0
    num_checkpoints: int = 0
    checkpoint_bytes: int = 0
    num_pages: int = 0
    num_host_stored: int = 0
    num_host_hits: int = 0
    num_host_hit_tokens: int = 0
    host_bytes_out: int = 0
    host_bytes_in: int = 0
    num_host_evicted: int = 0
    num_host_checkpoints: int = 0
    host_checkpoint_bytes: int = 0

    @classmethod
    def of(cls, prefix: PrefixCache | None) -> PrefixCounts:
        """The counts of ``prefix`` now (all zero without a prefix cache; the host
        level's zero without one)."""
        if prefix is None:
            return cls()
        stats, tree = prefix.stats, prefix.tree
        counts = cls(
            num_queried_tokens=stats.num_prompt_tokens,
            num_hit_tokens=stats.num_hit_tokens,
            num_hits=stats.num_hits,
            num_checkpoints_taken=stats.num_checkpoints_taken,
            num_evicted_pages=tree.num_evicted_pages,
            num_evicted_checkpoints=tree.num_evicted_checkpoints,
            num_checkpoints=tree.num_checkpoints,
            checkpoint_bytes=tree.num_checkpoints * tree.checkpoint_bytes,
            num_pages=tree.num_nodes if tree.has_pages else 0,
        )
        host = tree.host
        if host is None:
            return counts
        return replace(
            counts,
            num_host_stored=host.stats.num_kept,
            num_host_hits=host.stats.num_restored,
            num_host_hit_tokens=host.stats.num_hit_tokens,
            host_bytes_out=host.stats.num_bytes_out,
            host_bytes_in=host.stats.num_bytes_in,
            num_host_evicted=host.stats.num_dropped,
            num_host_checkpoints=len(host.nodes),
            host_checkpoint_bytes=len(host.nodes) * tree.checkpoint_bytes,
        )

    def since(self, before: PrefixCounts) -> PrefixCounts:
        """The counters' growth since ``before``; what is held is as now."""
        return self._combine(before, -1)

    def plus(self, growth: PrefixCounts) -> PrefixCounts:
        """These counters plus ``growth``'s; what is held is ``growth``'s."""
        return growth._combine(self, 1)

    def held_as(self, now: PrefixCounts) -> PrefixCounts:
        """These counters, with what ``now`` holds."""
        return replace(self, **{name: getattr(now, name) for name in HELD_COUNTS})

    def _combine(self, other: PrefixCounts, sign: int) -> PrefixCounts:
        """Counters: these plus ``sign`` times ``other``'s; what is held: these."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name) + sign * getattr(other, f.name)
                for f in fields(self)
                if f.name not in HELD_COUNTS
            },
        )

    @property
    def hit_rate(self) -> float:
        """Hit tokens over queried prompt tokens (0 before any query)."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


# `PrefixCounts` fields that say what the cache holds now (gauges), not what it did
HELD_COUNTS = frozenset(
    ("num_checkpoints", "checkpoint_bytes", "num_pages", "num_host_checkpoints",
     "host_checkpoint_bytes")
)  # fmt: skip


def clear_prefix_cache(prefix: PrefixCache) -> int:
    """Evict every cached unit that no live request uses; returns how many went."""
    num_evicted = 0
    while prefix.reclaim():
        num_evicted += 1
    return num_evicted
