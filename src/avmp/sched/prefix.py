"""Prefix caching for hybrid models: one radix tree over KV pages with state checkpoints
at chosen nodes, where to take checkpoints, and what to evict.

A node is one KV unit of the allocator (`CacheAllocator.kv_unit_tokens` tokens: a 16-token
page for AVMP, vLLM's block for the unified layout) and is keyed by that unit's content.
A recurrent layer resumes only from a checkpoint taken exactly at a node's end, so a hit
is the deepest matched node that has a checkpoint (any matched node for a model without
recurrent state). The allocator owns the units (`avmp.memory.cached`); the tree holds
their keys, and a lock count per node, so that nothing a live request uses is evicted.

Placement policies (`CHECKPOINT_POLICIES`), all on this one tree and budget:

- ``avmp`` (Marconi, arXiv 2411.19379): at the end of each prompt and of each output, and
  at the branch point where a request's prompt leaves the tree's pages (taken during
  that request's prefill: the scheduler ends a chunk there). In the engine, where a
  request may stop on its end-of-sequence token before the output's planned end, a
  decoding request also keeps a checkpoint at the last whole unit it completed, in
  free memory only (stop checkpoints: `PrefixCache.computed`).
- ``vllm-align``: vLLM v1's ``mamba_cache_mode="align"``: a state only at positions that
  are multiples of vLLM's hybrid attention block and end a step: prefill chunks are cut
  to whole blocks, the prompt's last aligned position ends one, and so does the
  aligned end of the prompt's KV hit when it passes the state hit by a block or more
  (vLLM's Marconi-style junction, vllm-project/vllm#37898); whole blocks reached in
  decode.
- ``sglang``: SGLang's hybrid radix cache: every ``max(64, page)`` tokens of a prompt and
  every 256 tokens of decode.

Eviction (`EVICTION_POLICIES`): ``flops`` scores a candidate as Marconi does, recency plus
the FLOPs a hit on it saves per byte it holds (both scaled to [0, 1] over the
candidates); ``lru`` by recency alone. A candidate is a leaf edge (a leaf and its chain
of single-child ancestors without checkpoint) or a checkpoint of an inner node. A
checkpoint with a deeper one below it on a path without branches saves ``flops``
nothing: every request seen so far that passed it went on to the deeper one.

Room (`ROOM_RULES`): on AVMP's pools an allocation whose pool is short takes chunks from
the other pool (a migration, often with a compaction) before it fails. When the short
pool holds cached units, ``reuse`` asks first whether the cache has paid for such moves
lately (`ReuseLedger`: the prefill time its hits saved against the time the migrations
it made necessary cost, both over the last admissions); while it has not, the short
pool's cached units are evicted before anything migrates, and a checkpoint that would
need a migration is not taken. ``migrate`` always lets capacity move first, ``evict``
always evicts first. The rates that turn FLOPs, chunk moves and copied bytes into
seconds come from the run's device (`DeviceRates`: the simulator's GPU profile and time
model, the engine's measured prefill and copy speeds).

Second level (`HostLevel`, ``PrefixCacheConfig.host_level``): a checkpoint evicted from
the device goes to the host tier when restoring it later would cost less than
recomputing its prefix and the tier has room (lower-valued host checkpoints give way,
ranked as the device level ranks); its pages stay in the tree, so a later hit copies the
state back over the host link instead of recomputing the prefix. Swapped-out requests
come first: the tier drops cached checkpoints to make room for them. The level copies
only while its copies pay (the prefill time its hits saved against the time its copies
took), and it starts with no credit: a checkpoint it declines leaves a ghost (its path's
key), and a later request that would have resumed from a ghost credits the level with
what that hit would have saved. A workload whose evicted checkpoints nobody resumes
(single-turn prompts) never copies one.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from avmp.memory.host_tier import HostExtent, HostTier
from avmp.memory.manager import AvmpManager
from avmp.memory.spec import CacheAllocator, PoolKind
from avmp.memory.unified import VllmBlockGeometry
from avmp.models.geometry import ModelGeometry

PREFIX_CACHE_CHOICES = ("off", "avmp", "vllm-align", "sglang")
CHECKPOINT_POLICIES = PREFIX_CACHE_CHOICES[1:]
EVICTION_POLICIES = ("flops", "lru")
CHECKPOINT_KINDS = ("output", "branch", "segment", "chunk", "stop")
"""The rules by which ``avmp`` places a checkpoint: an output's end, a branch point, a
prompt's first segment end, a prefill chunk's end, a decoding request's last whole unit
(`PrefixCache._stop_checkpoint`). The last three are speculative or free-memory only."""
DEMOTE_AFTER = 64
"""Checkpoints of a rule taken before its reuse rate can demote or promote it
(`PrefixTree.demoted`, `PrefixTree.promoted`)."""
SPECULATIVE_KINDS = frozenset({"segment", "chunk"})
SGLANG_PREFILL_INTERVAL_TOKENS = 64  # SGLang checkpoints every max(64, page) prompt tokens
SGLANG_DECODE_INTERVAL_TOKENS = 256  # ... and every 256 decoded tokens
ROOM_RULES = ("reuse", "migrate", "evict")
# The rates of a config built without a device (`DeviceRates` replaces them where the run
# knows its device): an H200's (dense bf16 peak, half its HBM bandwidth for a copy that
# reads and writes each byte, its PCIe 5.0 x16 host link at 80%: avmp.sim.timing's
# profile) and CUDA VMM's remap of one chunk between pools (68 us, reference/PEERS.md;
# the simulator's VMM_MIGRATION_S_PER_CHUNK).
DEVICE_FLOPS_PER_S = 989e12
COMPACTION_BYTES_PER_S = 4.8e12 / 2
MIGRATION_S_PER_CHUNK = 68e-6
HOST_BYTES_PER_S = 50.4e9


@dataclass(frozen=True)
class DeviceRates:
    """The device's speeds that the prefix cache's rules price time with.

    Attributes:
        flops_per_s: FLOPs per second a prefill achieves (what a hit's saved FLOPs cost).
        migration_s_per_chunk: moving one chunk between pools.
        compaction_bytes_per_s: the copy rate of a compaction.
        host_bytes_per_s: one direction of the host link (a checkpoint to or from the
            host tier).
    """

    flops_per_s: float = DEVICE_FLOPS_PER_S
    migration_s_per_chunk: float = MIGRATION_S_PER_CHUNK
    compaction_bytes_per_s: float = COMPACTION_BYTES_PER_S
    host_bytes_per_s: float = HOST_BYTES_PER_S

    def __post_init__(self) -> None:
        for name in ("flops_per_s", "compaction_bytes_per_s", "host_bytes_per_s"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"{name} must be a positive finite rate, got {value}")
        if not self.migration_s_per_chunk >= 0:
            raise ValueError(
                f"migration_s_per_chunk must be >= 0, got {self.migration_s_per_chunk}"
            )


@dataclass(frozen=True)
class PrefixCacheConfig:
    """How the prefix cache places checkpoints and evicts.

    Attributes:
        policy: one of `CHECKPOINT_POLICIES`.
        eviction: one of `EVICTION_POLICIES`.
        align_tokens: ``vllm-align`` only: vLLM's hybrid attention block in tokens
            (`avmp.memory.unified.VllmBlockGeometry`), a multiple of the tree's unit.
        flops_weight: Marconi's alpha: the weight of FLOPs per byte against recency.
        room: one of `ROOM_RULES`: whether an allocation that would migrate chunks
            evicts the short pool's cached units first; None: ``reuse`` for ``avmp``,
            ``migrate`` for the peers' policies (neither peer moves capacity).
        device_flops_per_s: ``reuse``: the device's compute, to price saved FLOPs.
        migration_s_per_chunk: ``reuse``: what moving one chunk between pools costs.
        compaction_bytes_per_s: ``reuse``: the copy rate of a compaction.
        reuse_half_life: ``reuse``: admissions over which what was observed halves
            (the default: one full batch at the scheduler's default limit).
        host_bytes_per_s: the host link, one direction: what moving a checkpoint to or
            from the host tier costs (``host_level``).
        host_level: keep checkpoints evicted from the device in the host tier, as a
            second level (`HostLevel`).
    """

    policy: str = "avmp"
    eviction: str = "flops"
    align_tokens: int = 0
    flops_weight: float = 1.0
    room: str | None = None
    device_flops_per_s: float = DEVICE_FLOPS_PER_S
    migration_s_per_chunk: float = MIGRATION_S_PER_CHUNK
    compaction_bytes_per_s: float = COMPACTION_BYTES_PER_S
    reuse_half_life: int = 256
    host_bytes_per_s: float = HOST_BYTES_PER_S
    host_level: bool = False

    def __post_init__(self) -> None:
        if self.policy not in CHECKPOINT_POLICIES:
            raise ValueError(
                f"unknown prefix cache policy {self.policy!r}; known: "
                f"{', '.join(CHECKPOINT_POLICIES)}"
            )
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(
                f"unknown eviction {self.eviction!r}; known: {', '.join(EVICTION_POLICIES)}"
            )
        if self.policy == "vllm-align" and self.align_tokens <= 0:
            raise ValueError("the vllm-align policy needs vLLM's block size (align_tokens)")
        if self.flops_weight < 0:
            raise ValueError(f"flops_weight must be >= 0, got {self.flops_weight}")
        if self.room is None:
            object.__setattr__(self, "room", "reuse" if self.policy == "avmp" else "migrate")
        if self.room not in ROOM_RULES:
            raise ValueError(f"unknown room rule {self.room!r}; known: {', '.join(ROOM_RULES)}")
        for name in ("device_flops_per_s", "migration_s_per_chunk", "compaction_bytes_per_s",
                     "host_bytes_per_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.reuse_half_life < 1:
            raise ValueError(f"reuse_half_life must be >= 1, got {self.reuse_half_life}")

    @property
    def rates(self) -> DeviceRates:
        return DeviceRates(self.device_flops_per_s, self.migration_s_per_chunk,
                           self.compaction_bytes_per_s, self.host_bytes_per_s)  # fmt: skip

    def with_rates(self, rates: DeviceRates) -> PrefixCacheConfig:
        """This config priced at ``rates`` (a run's own device)."""
        return replace(
            self,
            device_flops_per_s=rates.flops_per_s,
            migration_s_per_chunk=rates.migration_s_per_chunk,
            compaction_bytes_per_s=rates.compaction_bytes_per_s,
            host_bytes_per_s=rates.host_bytes_per_s,
        )


def prefix_cache_config(choice: str, geometry: ModelGeometry, block_size: int,
                        eviction: str | None = None, rates: DeviceRates | None = None,
                        host_level: bool = False) -> PrefixCacheConfig | None:  # fmt: skip
    """The prefix cache a policy name asks for, for one model (the simulator's and the
    engine's one resolution): None for ``off``; ``vllm-align`` takes vLLM's hybrid
    attention block of this model (`VllmBlockGeometry`); the eviction, when not given,
    is the policy's own (Marconi's FLOPs per byte for ``avmp``, LRU for the peers'
    rules, as they ship); ``rates``: the run's device (None: `DeviceRates`' defaults).

    Raises:
        ValueError: a name that is not one of `PREFIX_CACHE_CHOICES`, or a bad eviction.
    """
    if choice not in PREFIX_CACHE_CHOICES:
        raise ValueError(
            f"unknown prefix cache {choice!r}; known: {', '.join(PREFIX_CACHE_CHOICES)}"
        )
    if choice == "off":
        return None
    align = 0
    if choice == "vllm-align":
        align = VllmBlockGeometry.from_geometry(geometry, block_size).block_size or block_size
    if eviction is None:
        eviction = "flops" if choice == "avmp" else "lru"
    config = PrefixCacheConfig(choice, eviction, align, host_level=host_level)
    return config if rates is None else config.with_rates(rates)


def _no_score(candidate: tuple[PrefixNode, bool]) -> tuple[float, int]:
    raise AssertionError("no ranking yet")


def _negated(score: tuple[float, int]) -> tuple[float, int]:
    return -score[0], -score[1]


def prefill_flops(geometry: ModelGeometry, num_tokens: int) -> float:
    """FLOPs of prefilling ``num_tokens`` tokens from nothing: the active weights once per
    token and causal attention's pairs (what a hit of that length saves)."""
    pairs = num_tokens * (num_tokens + 1) / 2
    attention = 4 * geometry.hidden_size * geometry.num_attention_layers * pairs
    return 2.0 * geometry.num_active_params * num_tokens + attention


class Shortfall(NamedTuple):
    """What an allocation lacks on AVMP's pools: the pool to free units of, the chunks
    the allocator would move into it from the other pool (``migrates``), or, when both
    pools are short beyond the reserve, the larger shortfall (the allocation then fails:
    no migration can serve two short pools)."""

    pool: PoolKind
    num_chunks: int
    migrates: bool


def moving_pools(allocator: CacheAllocator) -> AvmpManager | None:
    """The AVMP manager behind ``allocator`` (through wrappers that forward, like the
    simulator's timer) when its pools move; None for a fixed layout."""
    while not isinstance(allocator, AvmpManager) and hasattr(allocator, "inner"):
        allocator = allocator.inner
    if not isinstance(allocator, AvmpManager) or allocator.fixed_state_fraction is not None:
        return None
    return allocator


def room_shortfall(allocator: CacheAllocator, num_pages: int, num_slots: int
                   ) -> Shortfall | None:  # fmt: skip
    """What allocating ``num_pages`` pages and ``num_slots`` slots would lack; None when
    it needs neither a migration nor more than the reserve (it fits, or the reserve
    covers it) or the layout's pools never move. Read from the AVMP manager's public
    counters, as `avmp.memory.migration.plan_room` decides."""
    manager = moving_pools(allocator)
    if manager is None:
        return None
    short = [(pool, _chunks_short(manager, pool, n))
             for pool, n in ((PoolKind.KV, num_pages), (PoolKind.STATE, num_slots))]  # fmt: skip
    short = [(pool, chunks) for pool, chunks in short if chunks]
    reserve = len(manager.reserve_chunks())
    if len(short) == 2:
        if short[0][1] + short[1][1] <= reserve:
            return None
        pool, needed = max(short, key=lambda s: s[1])
        return Shortfall(pool, needed, migrates=False)
    if not short or short[0][1] <= reserve:
        return None
    pool, needed = short[0]
    return Shortfall(pool, needed - reserve, migrates=True)


def _chunks_short(allocator: AvmpManager, pool: PoolKind, num_units: int) -> int:
    """Chunks ``pool`` lacks to hand out ``num_units`` more units (`Pool.chunks_short`)."""
    free = allocator.num_free_units(pool)
    if num_units <= free:
        return 0
    unit_bytes = allocator.spec.page_bytes if pool is PoolKind.KV else allocator.spec.slot_bytes
    used = allocator.num_units(pool) - free
    needed = -(-(used + num_units) * unit_bytes // allocator.config.chunk_bytes)
    return needed - len(allocator.pool_chunks(pool))


class ReuseLedger:
    """Whether the prefix cache has lately paid for the capacity it makes move.

    Saved: the prefill time its hits spared (`prefill_flops` of each hit at the device's
    rate). Spent: the time of each migration (and its compaction) that an allocation
    needs while the short pool holds cached units, whether the migration then ran or the
    cached units were evicted instead: that is the demand the cache's hold on memory
    creates. Both decay by half every ``reuse_half_life`` admissions, so the rule follows
    what the workload does now. The cache pays while saved exceeds spent: a cache nobody
    hits saves nothing and yields at once; a hit of a few hundred tokens pays for
    hundreds of chunk moves.
    """

    __slots__ = ("saved_s", "spent_s", "_decay", "_seconds_per_flop")

    def __init__(self, config: PrefixCacheConfig) -> None:
        self.saved_s = 0.0
        self.spent_s = 0.0
        self._decay = 0.5 ** (1.0 / config.reuse_half_life)
        self._seconds_per_flop = 1.0 / config.device_flops_per_s

    def admitted(self, saved_flops: float) -> None:
        """A request was admitted from scratch; its hit (if any) saved ``saved_flops``."""
        self.saved_s = self.saved_s * self._decay + saved_flops * self._seconds_per_flop
        self.spent_s *= self._decay

    def pays_for(self, move_s: float) -> bool:
        """Count a migration of ``move_s`` seconds that cached units call for; whether
        the cache's recent savings cover what such moves have cost it."""
        self.spent_s += move_s
        return self.saved_s > self.spent_s


class PrefixNode:
    """One KV unit of cached content: its key in the allocator, the checkpoint taken at
    its end (if any) on the device or (``host_key``) in the host tier, and how many live
    requests use it or a descendant (``num_locks``). ``depth`` counts units from the root
    (the root is depth 0 and holds nothing).

    ``dominated`` and ``edge_run`` summarise the unbranched paths through the node for
    the eviction rule (`PrefixTree._dominated`, `PrefixTree._edge_run`); None until
    asked for, and again whenever a change in the tree may alter them."""

    __slots__ = ("content", "parent", "children", "depth", "page_key", "checkpoint_key",
                 "last_use", "num_locks", "host_key", "speculative", "kind", "dominated",
                 "edge_run")  # fmt: skip

    def __init__(self, content: Hashable, parent: PrefixNode | None, depth: int) -> None:
        self.content = content
        self.parent = parent
        self.children: dict[Hashable, PrefixNode] = {}
        self.depth = depth
        self.page_key: int | None = None  # None for the root, or a model without attention
        self.checkpoint_key: int | None = None
        self.last_use = 0
        self.num_locks = 0
        self.host_key: int | None = None  # its checkpoint in the host tier (`HostLevel`)
        # its checkpoint was taken before any request asked for it (a first segment's or
        # a prefill chunk's end) and no request has resumed from it yet: evicted first
        self.speculative = False
        # which rule placed its checkpoint (`CHECKPOINT_KINDS`), until a request resumes
        # from it (then None): what `PrefixTree.demoted` learns each rule's reuse from
        self.kind: str | None = None
        self.dominated: bool | None = None
        self.edge_run: int | None = None

    def path(self) -> list[PrefixNode]:
        """The nodes from the root's child down to this one."""
        nodes: list[PrefixNode] = []
        node: PrefixNode | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


SlotCopier = Callable[[int, int], None]
"""Copies one slot's state into another, ``(src, dst)`` (the engine's device copy),
called at once, so that a later compaction moves the copied bytes."""

TokenSource = Callable[[int], Sequence[int]]
"""A request's token ids known so far, by its id: its prompt, then the outputs the host
has read (the engine's own list, which grows as tokens are read)."""


class TokenUnits(Sequence[Hashable]):
    """A request's units keyed by their exact token ids (the engine's keys, where the
    simulator's are content segments), so that two requests share a unit exactly when
    they share its tokens. Read from a list that grows as sampled tokens are read: an
    output unit is keyed once its tokens are known, which under the engine's overlap is a
    step after they were sampled, and always by the time a step that computed them is
    finished (its inputs were read before). Keys are built once, on first use.
    """

    __slots__ = ("tokens", "unit_tokens", "num_units", "_keys")

    def __init__(self, tokens: Sequence[int], unit_tokens: int, num_units: int) -> None:
        self.tokens = tokens
        self.unit_tokens = unit_tokens
        self.num_units = num_units
        self._keys: list[Hashable] = []

    def __len__(self) -> int:
        return self.num_units

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._key(i) for i in range(*index.indices(self.num_units))]
        if not -self.num_units <= index < self.num_units:
            raise IndexError(f"unit {index} of {self.num_units}")
        return self._key(index % self.num_units)

    def _key(self, index: int) -> Hashable:
        keys, unit = self._keys, self.unit_tokens
        while len(keys) <= index:
            end = (len(keys) + 1) * unit
            if end > len(self.tokens):
                raise RuntimeError(
                    f"unit {len(keys)} needs {end} tokens; {len(self.tokens)} are known"
                )
            keys.append(tuple(self.tokens[end - unit : end]))
        return keys[index]


class CheckpointCopy(NamedTuple):
    """A state copy between a request's slot and a checkpoint (the cache's key on a
    slot). In a plan: a hit, the checkpoint copied into the request's slot
    (``from_host``: from the host level; ``key`` is then its host key). In an outcome: a
    checkpoint taken from the request's slot (``kept``: its own slot, kept at its end,
    no copy)."""

    request_id: int
    key: int
    kept: bool = False
    from_host: bool = False


@dataclass(frozen=True)
class PrefixMatch:
    """What the tree holds of a prompt: ``node`` is the deepest usable hit (the root for
    none) and ``num_matched`` the units whose pages the tree holds along the prompt
    (``>= node.depth``); a request that goes on past them leaves the tree there."""

    node: PrefixNode
    num_matched: int


class PrefixTree:
    """The radix tree of cached prefixes over one allocator (see the module doc).

    Args:
        allocator: owns every cached unit; the tree holds keys to them.
        unit_tokens: tokens per node (the allocator's KV unit, or ``block_size`` for a
            model without attention).
        has_state: whether a hit needs a checkpoint (a model with recurrent layers).
        flops_of: FLOPs of prefilling that many tokens (`prefill_flops`).
        page_bytes: bytes of one node's page.
        checkpoint_bytes: bytes of one checkpoint (0 for a model without state).
    """

    def __init__(
        self,
        allocator: CacheAllocator,
        config: PrefixCacheConfig,
        unit_tokens: int,
        has_state: bool,
        flops_of: Callable[[int], float],
        page_bytes: int,
        checkpoint_bytes: int,
    ) -> None:
        self.allocator = allocator
        self.config = config
        self.unit_tokens = unit_tokens
        self.has_state = has_state
        self.has_pages = allocator.kv_unit_tokens > 0
        self.flops_of = flops_of
        self.page_bytes = page_bytes
        self.checkpoint_bytes = checkpoint_bytes
        self.root = PrefixNode(None, None, 0)
        self.pinned: dict[int, int] = {}  # id(node) -> hits whose copy is still to come
        # the eviction candidates, kept as the tree changes (`_refresh`): id(node) ->
        # (node, whether its whole edge goes)
        self._candidate_set: dict[int, tuple[PrefixNode, bool]] = {}
        self._version = 0
        self._ranked_at = -1
        self._ranking: list[tuple[PrefixNode, bool]] | None = None
        self._score: Callable[[tuple[PrefixNode, bool]], tuple[float, int]] = _no_score
        self.clock = 0
        self.num_nodes = 0
        self.num_checkpoints = 0
        self.num_evicted_pages = 0
        self.num_evicted_checkpoints = 0
        self.host: HostLevel | None = None  # the second level, once given a host tier
        # per placement rule (``avmp``): checkpoints taken, and those a request resumed from
        self.kinds_taken: dict[str, int] = dict.fromkeys(CHECKPOINT_KINDS, 0)
        self.kinds_reused: dict[str, int] = dict.fromkeys(CHECKPOINT_KINDS, 0)

    # ---- matching -----------------------------------------------------------------------

    def match(self, contents: Sequence[Hashable]) -> PrefixMatch:
        """The deepest hit along ``contents`` (one entry per whole unit the request may
        take from the cache), and how far the tree's pages follow it."""
        node, hit = self.root, self.root
        on_host: PrefixNode | None = None
        for content in contents:
            child = node.children.get(content)
            if child is None:
                break
            node = child
            if child.checkpoint_key is not None or not self.has_state:
                hit = child
            elif child.host_key is not None:
                on_host = child
        if on_host is not None and on_host.depth > hit.depth:
            assert self.host is not None
            if self.host.pays(on_host, hit.depth):  # copying it in beats computing the rest
                hit = on_host
        return PrefixMatch(hit, node.depth)

    def touch(self, node: PrefixNode) -> None:
        """Mark ``node`` and its ancestors used now."""
        self.clock += 1
        self._changed()
        for step in node.path():
            step.last_use = self.clock

    def reused(self, node: PrefixNode) -> None:
        """A request resumes from ``node``'s checkpoint: it is proven (no longer
        speculative), and its placement rule counts one reuse."""
        node.speculative = False
        if node.kind is not None:
            self.kinds_reused[node.kind] += 1
            node.kind = None
        self._changed()

    def demoted(self) -> frozenset[str]:
        """Placement rules whose checkpoints requests hardly resume from: of at least
        `DEMOTE_AFTER` taken, reused at under a tenth of the rate of the best-reused rule
        (a trace whose next turns do not repeat the answers, as Mooncake's hashed blocks:
        the answers' ends are never hit there). Their unproven checkpoints are evicted
        first, as speculative ones are, so that the rules that pay keep the room."""
        rates, best = self._rule_rates()
        return frozenset(kind for kind, rate in rates.items() if rate * 10 < best)

    def promoted(self) -> frozenset[str]:
        """Speculative rules (`SPECULATIVE_KINDS`) whose checkpoints requests resume from
        at least half as often as from the best rule's, of at least `DEMOTE_AFTER`
        taken: their checkpoints are then taken as the others are, evicting less
        valuable cached units, not only into idle memory (a trace whose shared
        documents and histories are found at chunk ends, as Mooncake's)."""
        rates, best = self._rule_rates()
        return frozenset(kind for kind, rate in rates.items()
                         if kind in SPECULATIVE_KINDS and rate * 2 >= best > 0)  # fmt: skip

    def _rule_rates(self) -> tuple[dict[str, float], float]:
        """Each rule's reuse rate (resumed from / taken), of the rules with at least
        `DEMOTE_AFTER` taken, and the best of them (0 when none)."""
        rates = {kind: self.kinds_reused[kind] / taken
                 for kind, taken in self.kinds_taken.items() if taken >= DEMOTE_AFTER}  # fmt: skip
        return rates, max(rates.values(), default=0.0)

    def lock(self, node: PrefixNode) -> None:
        """A live request uses ``node``'s path: nothing on it may be evicted."""
        for step in node.path():
            step.num_locks += 1
            if step.num_locks == 1 and len(step.children) == 1:  # else passes no edge anyway
                self._forget_edge_run(step)
            self._refresh(step)
        self._changed()

    def unlock(self, node: PrefixNode) -> None:
        for step in node.path():
            assert step.num_locks > 0, "unlocked more often than locked"
            step.num_locks -= 1
            if not step.num_locks and len(step.children) == 1:  # else passes no edge anyway
                self._forget_edge_run(step)
            self._refresh(step)
        self._changed()

    def page_keys(self, node: PrefixNode) -> list[int]:
        """The allocator's keys of the pages from the root down to ``node``."""
        if not self.has_pages:
            return []
        return [step.page_key for step in node.path() if step.page_key is not None]

    # ---- inserting ----------------------------------------------------------------------

    def insert(self, request_id: int, contents: Sequence[Hashable], locked: PrefixNode,
               num_units: int | None = None) -> PrefixNode:  # fmt: skip
        """Add the path of a live request's first ``num_units`` whole units of
        ``contents`` (None: all), holding the request's own pages where the tree has
        none, and move the request's lock from ``locked`` (a node on this path) to the
        path's end. The walk starts at ``locked``: the lock keeps the path above it in
        the tree, and a decoding request inserts a unit at a time (stop checkpoints),
        which from the root would cost its whole depth each time.

        Returns:
            The path's last node (locked for the request).
        """
        end = len(contents) if num_units is None else num_units
        assert locked.depth <= end, "the locked node lies below the path's end"
        node = locked
        for index in range(locked.depth, end):
            content = contents[index]
            child = node.children.get(content)
            if child is None:
                child = PrefixNode(content, node, node.depth + 1)
                if self.has_pages:
                    child.page_key = self.allocator.cache_kv_unit(request_id, index)
                node.children[content] = child
                self._children_changed(node)
                self.num_nodes += 1
            node = child
        self.lock(node)
        self.unlock(locked)
        self.touch(node)
        return node

    def attach_checkpoint(self, node: PrefixNode, key: int, kind: str | None = None) -> bool:
        """Give ``node`` the checkpoint ``key``, placed by the rule ``kind`` (one of
        `CHECKPOINT_KINDS`; None: not counted); returns False (and the caller releases the
        key) when it already has one."""
        if node.checkpoint_key is not None:
            return False
        node.checkpoint_key = key
        self._checkpoint_changed(node)
        if kind is not None:
            node.kind = kind
            self.kinds_taken[kind] += 1
        self.num_checkpoints += 1
        self._refresh(node)
        if node.host_key is not None and id(node) not in self.pinned:
            assert self.host is not None
            self.host.drop(node)  # the device's copy serves its hits now
        self._changed()
        return True

    # ---- eviction -----------------------------------------------------------------------

    def evict_one(self, pool: PoolKind | None = None, strict: bool = False) -> bool:
        """Evict the least valuable unlocked candidate; False when nothing can go.

        Args:
            pool: the pool an allocation found short: the least valuable candidate
                that frees a unit of it goes first (evicting in the other pool would
                free room only through a migration, and compaction), else any.
            strict: only a candidate that frees a unit of ``pool``: False when none
                can go (room made without moving capacity).

        A run of evictions with nothing else changing the tree in between (one failed
        allocation's) ranks the candidates once: walking the tree per eviction cost
        minutes on traces whose trees hold thousands of pages. A parent that an
        eviction leaves a leaf joins the ranking, scored on the same scale.
        """
        if self._ranking is None or self._ranked_at != self._version:
            candidates = self._candidates()
            if not candidates:
                return False
            self._score = self._scorer(candidates)
            self._ranking = sorted(candidates, key=self._score, reverse=True)
            self._ranked_at = self._version
        picked = self._pick(pool, strict)
        if picked is None:  # every ranked candidate went earlier in the run: rank anew
            self._ranking = None
            return self.evict_one(pool, strict)
        if picked is _NONE_FREES:
            return False
        assert isinstance(picked, tuple)
        victim, whole_edge = picked
        if whole_edge and self._moved_to_host(victim, pool):
            self._drop_checkpoint(victim, keep=False)  # its pages stay for its hits
        elif whole_edge:
            parent = self._evict_edge(victim)
            if parent is not None and not parent.children and not parent.num_locks:
                bisect.insort(self._ranking, (parent, True), key=lambda c: _negated(self._score(c)))
        else:
            self._drop_checkpoint(victim)
        return True

    def _pick(self, pool: PoolKind | None, strict: bool = False
              ) -> tuple[PrefixNode, bool] | object | None:  # fmt: skip
        """Take the next victim off the ranking (lowest last): the least valuable that
        frees a unit of ``pool`` if one does, else the least valuable (``strict``:
        `_NONE_FREES`). None: no ranked candidate is left."""
        ranking = self._ranking
        assert ranking is not None
        while ranking and not self._still_candidate(*ranking[-1]):
            ranking.pop()
        if not ranking:
            return None
        if pool is not None and not self._frees(ranking[-1], pool):
            for index in range(len(ranking) - 2, -1, -1):
                candidate = ranking[index]
                if self._frees(candidate, pool) and self._still_candidate(*candidate):
                    return ranking.pop(index)
            if strict:
                return _NONE_FREES
        return ranking.pop()

    def _moved_to_host(self, leaf: PrefixNode, pool: PoolKind | None) -> bool:
        """Whether evicting a leaf's edge for ``pool`` moves only its checkpoint, to the
        host level (pages are kilobytes where a checkpoint is megabytes, and a hit needs
        both): when the state pool is short, or no pool is named, and the host level
        takes the checkpoint (copied out here)."""
        return (self.host is not None and leaf.checkpoint_key is not None
                and pool is not PoolKind.KV and self.host.keep(leaf))  # fmt: skip

    def _frees(self, candidate: tuple[PrefixNode, bool], pool: PoolKind) -> bool:
        node, whole_edge = candidate
        if pool is PoolKind.KV:
            return whole_edge and self.has_pages
        return node.checkpoint_key is not None

    def _still_candidate(self, node: PrefixNode, whole_edge: bool) -> bool:
        """Whether a ranked candidate can still go (a ranking is made before the
        evictions of its run, which may have removed it)."""
        parent = node.parent
        if parent is None or parent.children.get(node.content) is not node:
            return False
        if whole_edge:
            return not node.children and not node.num_locks
        return node.checkpoint_key is not None and id(node) not in self.pinned

    def _changed(self) -> None:
        """Anything but an eviction changed the tree: the next eviction ranks anew."""
        self._version += 1

    def pin(self, node: PrefixNode) -> None:
        """Keep ``node``'s checkpoint until a hit has copied it (`unpin`)."""
        self.pinned[id(node)] = self.pinned.get(id(node), 0) + 1
        self._refresh(node)
        self._changed()

    def unpin(self, node: PrefixNode) -> None:
        count = self.pinned.pop(id(node))
        if count > 1:
            self.pinned[id(node)] = count - 1
        elif node.checkpoint_key is not None and node.host_key is not None:
            assert self.host is not None
            self.host.drop(node)  # a device checkpoint came while a hit read the host's
        self._refresh(node)
        self._changed()

    def _candidates(self) -> list[tuple[PrefixNode, bool]]:
        """Unlocked leaves (as whole edges), and checkpoints of every other node but the
        pinned: a live request holds its path's pages, not the checkpoints on it, which
        only the cache holds. Kept as the tree changes (`_refresh`): a walk over the
        whole tree per ranking cost most of a long trace's replay."""
        return list(self._candidate_set.values())

    def _refresh(self, node: PrefixNode) -> None:
        """Put ``node`` in or out of the candidates after a change of its locks, children,
        checkpoint or pin."""
        if node is self.root:
            return
        key = id(node)
        if node.num_locks:
            whole: bool | None = None
            if node.checkpoint_key is not None and key not in self.pinned:
                whole = False
        elif not node.children:
            whole = True
        else:
            whole = False if node.checkpoint_key is not None else None
        if whole is None:
            self._candidate_set.pop(key, None)
        else:
            self._candidate_set[key] = (node, whole)

    def _walked_candidates(self) -> list[tuple[PrefixNode, bool]]:
        """The candidates found by walking the whole tree (`check_integrity` compares)."""
        found: list[tuple[PrefixNode, bool]] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.num_locks:
                if node.checkpoint_key is not None and id(node) not in self.pinned:
                    found.append((node, False))
                stack.extend(node.children.values())  # a locked node's subtree may be free
                continue
            if not node.children:
                found.append((node, True))
                continue
            if node.checkpoint_key is not None:
                found.append((node, False))
            stack.extend(node.children.values())
        return found

    def _edge(self, leaf: PrefixNode) -> list[PrefixNode]:
        """``leaf`` and its single-child, checkpoint-free, unlocked ancestors."""
        nodes = [leaf]
        parent = leaf.parent
        while parent is not None and _edge_passes(parent):
            nodes.append(parent)
            parent = parent.parent
        return nodes

    # ---- unbranched paths, remembered -----------------------------------------------
    # A ranking values every candidate, and on a long trace's tree the walks along
    # unbranched paths (`_is_dominated` down, `_edge` up) cost most of a replay: each
    # node remembers their outcome until a change on its path, which forgets it.

    def _dominated(self, node: PrefixNode) -> bool:
        """`_is_dominated(node)`: the path below ``node`` runs without a branch to a
        deeper checkpoint. Remembered along that path."""
        chain: list[PrefixNode] = []
        while node.dominated is None:
            if len(node.children) != 1:
                node.dominated = False
                break
            (child,) = node.children.values()
            if child.checkpoint_key is not None:
                node.dominated = True
                break
            chain.append(node)
            node = child
        dominated = node.dominated
        for step in chain:
            step.dominated = dominated
        return dominated

    def _edge_run(self, node: PrefixNode) -> int:
        """How many nodes in a row from ``node`` up an edge passes through: unlocked,
        single-child, without a checkpoint on either level, not the root (`_edge` of a
        leaf below ``node`` is one longer). Remembered along that run."""
        chain: list[PrefixNode] = []
        while node.edge_run is None:
            parent = node.parent
            if parent is None or not _edge_passes(node):
                node.edge_run = 0
                break
            chain.append(node)
            node = parent
        run = node.edge_run
        for step in reversed(chain):
            run += 1
            step.edge_run = run
        return run

    def _children_changed(self, node: PrefixNode) -> None:
        self._forget_dominated(node)
        self._forget_edge_run(node)

    def _checkpoint_changed(self, node: PrefixNode) -> None:
        """``node``'s device checkpoint came or went."""
        if node.parent is not None:
            self._forget_dominated(node.parent)
        self._forget_edge_run(node)

    def _host_key_changed(self, node: PrefixNode) -> None:
        self._forget_edge_run(node)

    def _forget_dominated(self, node: PrefixNode) -> None:
        """``node``'s children or its child's checkpoint changed: forget its `_dominated`,
        and that of the ancestors whose answer reads it. An answer that reads its child's
        has the child's remembered (`_dominated` fills the path), so the climb stops at a
        node already forgotten."""
        if node.dominated is False and len(node.children) != 1:
            return  # still False: nothing above changes
        while node.dominated is not None:
            node.dominated = None
            parent = node.parent
            if parent is None or len(parent.children) != 1 or node.checkpoint_key is not None:
                return  # the parent's answer does not read this node's
            node = parent

    def _forget_edge_run(self, node: PrefixNode) -> None:
        """Something `_edge_passes` reads of ``node`` changed: forget its `_edge_run` and
        the runs below that count it, unless it still passes (or still does not), which
        leaves every run as it was. A positive run has its parent's remembered
        (`_edge_run` fills the run), so a node already forgotten has no remembered run
        below it that counts it."""
        run = node.edge_run
        if run is None or (run > 0) == _edge_passes(node):
            return
        node.edge_run = None
        for child in node.children.values():
            while child.edge_run:  # positive: it counts its parent's, and has one child
                child.edge_run = None
                (child,) = child.children.values()

    def _value_per_byte(self, node: PrefixNode, whole_edge: bool) -> float:
        """FLOPs a hit on this candidate saves per byte that evicting it frees."""
        tokens = node.depth * self.unit_tokens
        if not whole_edge:
            if self._dominated(node):
                return 0.0  # no branch below it yet: a hit would take the deeper one
            return self.flops_of(tokens) / max(1, self.checkpoint_bytes)
        if self.has_state and node.checkpoint_key is None and node.host_key is None:
            return 0.0  # pages without a checkpoint below them resume nothing
        assert node.parent is not None
        edge_length = 1 + self._edge_run(node.parent)  # len(self._edge(node))
        num_bytes = edge_length * self.page_bytes
        if node.checkpoint_key is not None or node.host_key is not None:
            # a host checkpoint's pages count its bytes too, as on the device: on their
            # kilobytes alone they would outrank every device checkpoint
            num_bytes += self.checkpoint_bytes
        start = (node.depth - edge_length) * self.unit_tokens
        saved = self.flops_of(tokens)
        if not self.has_state:  # the edge's own pages save only their tokens
            saved -= self.flops_of(start)
        return saved / max(1, num_bytes)

    def _scorer(self, candidates: list[tuple[PrefixNode, bool]]
                ) -> Callable[[tuple[PrefixNode, bool]], tuple[float, int]]:  # fmt: skip
        """Lowest first: recency alone (``lru``), or Marconi's recency plus weighted FLOPs
        per byte, each scaled to [0, 1] over the candidates; ties go to the older."""
        demoted = self.demoted()

        def unproven(c: tuple[PrefixNode, bool]) -> bool:
            node = c[0]
            return node.checkpoint_key is not None and (node.speculative or node.kind in demoted)

        if self.config.eviction == "lru":
            return lambda c: (_UNPROVEN if unproven(c) else float(c[0].last_use), c[0].depth)
        uses = [c[0].last_use for c in candidates]
        values = {id(c[0]): self._value_per_byte(*c) for c in candidates}
        low_use, span_use = min(uses), max(1, max(uses) - min(uses))
        low_value = min(values.values())
        span_value = max(values.values()) - low_value or 1.0
        weight = self.config.flops_weight

        def score(c: tuple[PrefixNode, bool]) -> tuple[float, int]:
            recency = (c[0].last_use - low_use) / span_use
            if unproven(c):
                return _UNPROVEN, c[0].last_use
            value = values.get(id(c[0]))
            if value is None:  # a parent that an eviction left a leaf, unranked before
                value = values[id(c[0])] = self._value_per_byte(*c)
            return recency + weight * (value - low_value) / span_value, c[0].last_use

        return score

    def _evict_edge(self, leaf: PrefixNode) -> PrefixNode | None:
        """Evict a leaf's edge; returns the node the edge hung from (None: the root)."""
        edge = self._edge(leaf)
        for node in edge:
            if node.checkpoint_key is not None:
                self._drop_checkpoint(node, keep=False)  # its pages go: nothing to resume
            if node.host_key is not None:
                assert self.host is not None
                self.host.drop(node)
            if node.page_key is not None:
                self.allocator.release_cached(node.page_key)
                self.num_evicted_pages += 1
            assert node.parent is not None
            del node.parent.children[node.content]
            self._children_changed(node.parent)
            self._candidate_set.pop(id(node), None)
            self.num_nodes -= 1
        top = edge[-1].parent
        if top is not None:
            self._refresh(top)
        return None if top is None or top is self.root else top

    def release_checkpoint(self, node: PrefixNode) -> None:
        """Give ``node``'s checkpoint back, not as an eviction: a deeper one of the same
        request serves its hits (`PrefixCache._release_stop_checkpoint`)."""
        assert node.checkpoint_key is not None
        self.allocator.release_cached(node.checkpoint_key)
        node.checkpoint_key = None
        self._checkpoint_changed(node)
        self.num_checkpoints -= 1
        self._refresh(node)
        self._changed()

    def _drop_checkpoint(self, node: PrefixNode, keep: bool = True) -> None:
        """Evict ``node``'s checkpoint from the device; ``keep``: into the host level
        when it takes it (copied out before the slot is released)."""
        assert node.checkpoint_key is not None
        if keep and self.host is not None:
            self.host.keep(node)
        self.allocator.release_cached(node.checkpoint_key)
        node.checkpoint_key = None
        self._checkpoint_changed(node)
        node.speculative = False
        node.kind = None
        self.num_checkpoints -= 1
        self.num_evicted_checkpoints += 1
        self._refresh(node)

    # ---- invariants ---------------------------------------------------------------------

    def _check_remembered_paths(self) -> None:
        """Every remembered `_dominated` and `_edge_run` is what the tree gives now, and
        the answers it reads are remembered too (which lets `_forget_dominated` and
        `_forget_edge_run` stop at a node already forgotten)."""
        order = [self.root]
        for node in order:  # parents before children
            order.extend(node.children.values())
        runs: dict[int, int] = {}
        for node in order:
            passes = _edge_passes(node)
            runs[id(node)] = 1 + runs[id(node.parent)] if passes else 0
            if node.edge_run is not None:
                assert node.edge_run == runs[id(node)], "a remembered edge run out of date"
                assert not passes or (
                    node.parent is not None and node.parent.edge_run is not None
                ), "an edge run remembered above a forgotten one"
        dominated: dict[int, bool] = {}
        for node in reversed(order):
            dominated[id(node)] = False
            if len(node.children) == 1:
                (child,) = node.children.values()
                reads_child = child.checkpoint_key is None
                dominated[id(node)] = not reads_child or dominated[id(child)]
                if node.dominated is not None:
                    assert not reads_child or child.dominated is not None, (
                        "domination remembered above a forgotten one"
                    )
            if node.dominated is not None:
                assert node.dominated == dominated[id(node)], "a remembered domination out of date"

    def check_integrity(self, num_live_locks: int | None = None) -> None:
        """Raise AssertionError unless the tree and the allocator's keys agree.

        Args:
            num_live_locks: the paths live requests hold below the root, if known: the
                root's children's locks must add up to it.
        """
        keys: list[int] = []
        checkpoints = nodes = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            child_locks = 0
            for content, child in node.children.items():
                assert child.content == content and child.parent is node, "tree links"
                assert child.depth == node.depth + 1, "depth"
                assert (child.page_key is not None) == self.has_pages, "a node without its page"
                child_locks += child.num_locks
                stack.append(child)
            if node is not self.root:
                nodes += 1
                assert node.num_locks >= child_locks, "a child locked more than its parent"
                keys += [k for k in (node.page_key, node.checkpoint_key) if k is not None]
                checkpoints += node.checkpoint_key is not None
                assert node.host_key is None or (
                    self.host is not None and self.host.nodes.get(node.host_key) is node
                ), "a host checkpoint its level does not hold"
            elif num_live_locks is not None:
                assert child_locks == num_live_locks, "locks do not match the live requests"
        assert sorted(keys) == self.allocator.cached_keys(), "tree keys vs the allocator's"
        assert nodes == self.num_nodes and checkpoints == self.num_checkpoints, "counts"
        walked = {id(n): (n, whole) for n, whole in self._walked_candidates()}
        assert walked == self._candidate_set, "eviction candidates out of date"
        self._check_remembered_paths()
        if self.host is not None:
            self.host.check_integrity()


class HostCheckpointCopier(Protocol):
    """Carries out the host level's copies (the engine's pinned host arena); the
    simulator has none and charges the bytes at its host link. Called while the
    scheduler plans or finishes a step, in the order of `avmp.sched.swap.Swapper`'s
    copies: after the device work already issued that wrote the slot, before any
    device work issued after the call."""

    def to_host(self, slot: int, extent: HostExtent) -> None:
        """Copy checkpoint slot ``slot`` (the state pool's unit) into ``extent``."""

    def from_host(self, extent: HostExtent, slot: int) -> None:
        """Copy ``extent`` back into the state pool's unit ``slot``."""


@dataclass
class HostLevelStats:
    """What the second level did: checkpoints kept (copied out), refused (not worth a
    copy, or no room among less valuable ones), declined (its copies out have not paid
    lately), dropped (for a better one, for a swapped-out request, or with their pages),
    hits served from it and their bytes."""

    num_kept: int = 0
    num_refused: int = 0
    num_declined: int = 0  # worth a copy, but the level's copies have not paid lately
    num_missed: int = 0  # declined ones a later request would have resumed from
    num_dropped: int = 0
    num_restored: int = 0
    num_hit_tokens: int = 0
    num_bytes_out: int = 0
    num_bytes_in: int = 0
    peak_checkpoints: int = 0


class HostLevel:
    """Checkpoints evicted from the device, kept in the host tier (`HostTier`'s cached
    extents) as a second level of the tree: each is one node's state; the node keeps
    its pages on the device, so a hit on it copies the state back into the request's
    slot over the host link instead of computing its prefix again.

    A checkpoint is kept when restoring it costs less than computing its prefix from
    nothing (the FLOPs of ``depth`` units at the device's rate against its bytes over
    the host link) and no deeper checkpoint on a path without branches serves its hits;
    when the tier is full, host checkpoints worth less give way, ranked as the device
    level ranks (`PrefixCacheConfig.eviction`). And only while the level pays for its
    copies: the prefill time its hits saved (less their copies in) against the time its
    copies out took, both halving every ``reuse_half_life`` evictions it sees. It starts
    with no credit: a declined checkpoint is remembered as a ghost (the key of its path,
    `path_key`), and a request that would have resumed from one (`missed`) credits what
    that hit would have saved, the first such miss one fill of the tier besides (the
    evidence that evicted checkpoints are asked for again). So a workload whose evicted
    checkpoints nobody resumes (single-turn prompts, few-shot prompts' output ends)
    copies none out, and pays for no copy and for no page kept on the device for one.
    ``nodes`` maps host keys (minted here, never reused) to their nodes.
    """

    def __init__(self, tree: PrefixTree, tier: HostTier,
                 copier: HostCheckpointCopier | None = None) -> None:  # fmt: skip
        self.tree = tree
        self.tier = tier
        self.copier = copier
        self.nodes: dict[int, PrefixNode] = {}
        self.stats = HostLevelStats()
        rates = tree.config.rates
        self._copy_s = tree.checkpoint_bytes / rates.host_bytes_per_s
        self._s_per_flop = 1.0 / rates.flops_per_s
        self._next_key = 0
        self._decay = 0.5 ** (1.0 / tree.config.reuse_half_life)
        self.saved_s = 0.0
        self.spent_s = 0.0
        holds = tier.capacity_bytes // max(1, tree.checkpoint_bytes)  # checkpoints
        self._credit_s = holds * self._copy_s  # the first miss's grant: one fill of the tier
        # declined checkpoints: path key -> depth, oldest first, as many as the tier holds
        self._ghosts: OrderedDict[int, int] = OrderedDict()
        self._max_ghosts = max(1, holds)
        tier.reclaim_cached = self.reclaim  # a swapped-out request comes first

    def pays(self, node: PrefixNode, from_depth: int) -> bool:
        """Whether copying ``node``'s state in beats computing its tokens past
        ``from_depth`` units (where the request would start otherwise)."""
        return self._prefill_s(node.depth, from_depth) > self._copy_s

    def _prefill_s(self, depth: int, from_depth: int) -> float:
        """Seconds of computing units ``from_depth`` to ``depth`` at the device's rate."""
        unit, flops_of = self.tree.unit_tokens, self.tree.flops_of
        return (flops_of(depth * unit) - flops_of(from_depth * unit)) * self._s_per_flop

    def keep(self, node: PrefixNode) -> bool:
        """Copy ``node``'s device checkpoint into the tier if it is worth its copy and
        room can be made; returns whether it was kept."""
        tree = self.tree
        assert node.checkpoint_key is not None and node.host_key is None
        num_bytes = tree.checkpoint_bytes
        if _is_dominated(node, on_host=True) or not self.pays(node, 0):
            self.stats.num_refused += 1
            return False
        self.saved_s *= self._decay
        self.spent_s *= self._decay
        if self.spent_s + self._copy_s > self.saved_s:
            self.stats.num_declined += 1
            ghost = path_key(n.content for n in node.path())
            self._ghosts[ghost] = node.depth
            self._ghosts.move_to_end(ghost)
            while len(self._ghosts) > self._max_ghosts:
                self._ghosts.popitem(last=False)
            return False
        while not self.tier.could_reserve_cached(num_bytes):
            victim = self._least_valuable(node)
            if victim is None:
                self.stats.num_refused += 1
                return False
            self.drop(victim)
        key, self._next_key = self._next_key, self._next_key + 1
        extent = self.tier.reserve_cached(key, num_bytes)
        assert extent is not None
        if self.copier is not None:
            self.copier.to_host(tree.allocator.cached_unit(node.checkpoint_key), extent)
        node.host_key = key
        tree._host_key_changed(node)
        self.nodes[key] = node
        self.spent_s += self._copy_s
        stats = self.stats
        stats.num_kept += 1
        stats.num_bytes_out += num_bytes
        stats.peak_checkpoints = max(stats.peak_checkpoints, len(self.nodes))
        return True

    def missed(self, contents: Sequence[Hashable], from_depth: int) -> None:
        """A request admitted along ``contents`` starts at unit ``from_depth``: if a
        deeper prefix of it is a ghost (a checkpoint the level declined), credit what
        restoring it would have saved, once."""
        if not self._ghosts:
            return
        key, deepest = 0, None
        for depth, content in enumerate(contents, start=1):
            key = _extend_key(key, content)
            if depth > from_depth and key in self._ghosts:
                deepest = key
        if deepest is None:
            return
        saved = self._prefill_s(self._ghosts.pop(deepest), from_depth)
        if saved > self._copy_s:
            self.saved_s += saved - self._copy_s + self._credit_s
            self._credit_s = 0.0
            self.stats.num_missed += 1

    def restore(self, node: PrefixNode, slot: int) -> None:
        """Copy ``node``'s host checkpoint into the state pool's unit ``slot`` (a hit)."""
        assert node.host_key is not None
        if self.copier is not None:
            self.copier.from_host(self.tier.cached_extent(node.host_key), slot)
        tokens = node.depth * self.tree.unit_tokens
        self.saved_s += self._prefill_s(node.depth, 0) - self._copy_s
        self.stats.num_restored += 1
        self.stats.num_hit_tokens += tokens
        self.stats.num_bytes_in += self.tree.checkpoint_bytes

    def drop(self, node: PrefixNode) -> None:
        """Forget ``node``'s host checkpoint and give its extent back."""
        assert node.host_key is not None
        self.tier.release_cached(node.host_key)
        del self.nodes[node.host_key]
        node.host_key = None
        self.tree._host_key_changed(node)
        self.stats.num_dropped += 1

    def reclaim(self) -> bool:
        """Drop the least valuable host checkpoint that no hit waits on (the tier makes
        room for a swapped-out request); False when none can go."""
        victim = self._least_valuable(None)
        if victim is None:
            return False
        self.drop(victim)
        self.tree._changed()  # the victim's pages lost their value
        return True

    def _least_valuable(self, newcomer: PrefixNode | None) -> PrefixNode | None:
        """The host checkpoint to drop for ``newcomer`` (None: for a request): the
        lowest ranked that no hit waits on, and only below ``newcomer``'s rank."""
        pinned = self.tree.pinned
        held = [n for n in self.nodes.values() if id(n) not in pinned]
        if not held:
            return None
        ranked = held if newcomer is None else [*held, newcomer]
        score = self._scorer(ranked)
        victim = min(held, key=score)
        if newcomer is not None and score(victim) >= score(newcomer):
            return None
        return victim

    def _scorer(self, nodes: list[PrefixNode]) -> Callable[[PrefixNode], tuple[float, int]]:
        """As the device level ranks: recency (``lru``), or recency plus weighted FLOPs
        saved per byte, each scaled to [0, 1] over ``nodes`` (every host checkpoint
        takes the same bytes, so per byte is per checkpoint)."""
        if self.tree.config.eviction == "lru":
            return lambda n: (float(n.last_use), n.depth)
        tree = self.tree
        values = {id(n): tree.flops_of(n.depth * tree.unit_tokens) for n in nodes}
        uses = [n.last_use for n in nodes]
        low_use, span_use = min(uses), max(1, max(uses) - min(uses))
        low_value = min(values.values())
        span_value = max(values.values()) - low_value or 1.0
        weight = tree.config.flops_weight

        def score(n: PrefixNode) -> tuple[float, int]:
            recency = (n.last_use - low_use) / span_use
            return recency + weight * (values[id(n)] - low_value) / span_value, n.last_use

        return score

    def check_integrity(self) -> None:
        """Raise AssertionError unless the level's keys, its nodes and the tier agree."""
        assert sorted(self.nodes) == self.tier.cached_keys, "host keys vs the tier's"
        for key, node in self.nodes.items():
            assert node.host_key == key, "a node that lost its host key"
            assert node.parent is not None and node.parent.children.get(node.content) is node, (
                "a host checkpoint of a node no longer in the tree"
            )
            assert node.checkpoint_key is None or id(node) in self.tree.pinned, (
                "a checkpoint on both levels"
            )


_NONE_FREES = object()  # `PrefixTree._pick`: candidates are left, none frees the pool


_UNPROVEN = -math.inf
"""The eviction score of a speculative checkpoint no request has resumed from, or one of
a demoted rule (`PrefixTree.demoted`): first."""


def _extend_key(key: int, content: Hashable) -> int:
    return hash((key, content))


def path_key(contents: Iterable[Hashable]) -> int:
    """A key of a path of unit contents from the root (`HostLevel`'s ghosts): equal
    paths give equal keys; `HostLevel.missed` extends it one unit at a time."""
    key = 0
    for content in contents:
        key = _extend_key(key, content)
    return key


def _edge_passes(node: PrefixNode) -> bool:
    """Whether a leaf's edge (`PrefixTree._edge`) may run on through ``node``."""
    return (node.parent is not None and len(node.children) == 1 and not node.num_locks
            and node.checkpoint_key is None and node.host_key is None)  # fmt: skip


def _is_dominated(node: PrefixNode, on_host: bool = False) -> bool:
    """Whether the path below ``node`` runs without a branch to a deeper checkpoint
    (``on_host``: on the device or in the host tier)."""
    while len(node.children) == 1:
        (node,) = node.children.values()
        if node.checkpoint_key is not None or (on_host and node.host_key is not None):
            return True
    return False


def unit_contents(segments: Sequence[tuple[Hashable, int]], num_units: int, unit_tokens: int,
                  ) -> list[Hashable]:  # fmt: skip
    """What each of the first ``num_units`` whole units of a token stream holds: the
    pieces ``(content id, offset, tokens)`` that make it up, so that two streams agree on
    a unit exactly when they agree on its tokens."""
    contents: list[Hashable] = []
    pieces: list[tuple[Hashable, int, int]] = []
    room = unit_tokens
    for content_id, length in segments:
        offset = 0
        while offset < length and len(contents) < num_units:
            take = min(room, length - offset)
            pieces.append((content_id, offset, take))
            offset += take
            room -= take
            if not room:
                contents.append(tuple(pieces))
                pieces, room = [], unit_tokens
        if len(contents) >= num_units:
            break
    return contents


def segment_boundaries(content: Sequence[tuple[Hashable, int]], prompt_tokens: int,
                       unit_tokens: int) -> set[int]:  # fmt: skip
    """Where ``avmp`` checkpoints a prompt of several segments besides its branch point:
    the end of its first segment (a system prompt, a few-shot template), at the whole
    unit at or below it, if that lies below the prompt's last whole unit (a prompt's
    own end is not kept: `PrefixCache._targets`). One only, whatever the segments: a
    trace's segments may be fixed-size blocks (Mooncake's 512-token hashes), not
    messages; and the start of a conversation's new message is the previous turn's
    output end, checkpointed already."""
    if not content:
        return set()
    end = content[0][1] // unit_tokens * unit_tokens
    return {end} if 0 < end < (prompt_tokens - 1) // unit_tokens * unit_tokens else set()


class _Tracked:
    """A live request's place in the prefix cache: its stream's unit contents, the node
    it holds locked, the token positions at which it still takes a checkpoint (lowest
    first), those of them taken only where a step ends exactly (``cuts``; the others are
    read from the prefill kernel's chunk states as it passes them, as SGLang does), and
    the positions where the scheduler ends a prefill chunk (``stops``)."""

    __slots__ = ("contents", "node", "targets", "cuts", "pinned", "last", "pending",
                 "pages_only", "speculative", "prompt", "spec_from", "ideal_level",
                 "ideal_units", "stops", "align", "matched", "stop_from", "stop_until",
                 "stop_node")  # fmt: skip

    def __init__(self, contents: Sequence[Hashable], node: PrefixNode, targets: list[int],
                 cuts: set[int]) -> None:  # fmt: skip
        self.contents = contents
        self.node = node
        self.targets = targets
        self.cuts = cuts
        self.pinned: PrefixNode | None = None  # the hit, until its checkpoint is copied
        self.last = 0  # the position of the request's final state (its stream's end)
        self.pending = False  # the final state's checkpoint waits for the request's free
        self.pages_only: set[int] = set()  # targets that insert pages, no checkpoint
        self.speculative: set[int] = set()  # targets kept only in memory left idle
        self.prompt = 0  # the prompt's tokens
        self.spec_from = 0  # a prefill chunk's end past this keeps a speculative checkpoint
        self.ideal_level: dict[Hashable, dict] = {}  # type: ignore[type-arg]  # trie level
        self.ideal_units = 0  # units of the stream in the ideal's trie
        self.stops: set[int] = cuts
        self.align = 0  # ``vllm-align``: prefill chunks end on whole blocks of this size
        self.matched = 0  # prompt tokens whose pages the tree held at admission
        # stop checkpoints (`PrefixCache.computed`): at whole units in [from, until)
        self.stop_from = self.stop_until = 0
        self.stop_node: PrefixNode | None = None  # the latest one, while it stands


@dataclass
class PrefixStats:
    """What the prefix cache did: tokens taken from it, the ideal (every token of a prompt
    that an earlier request's prompt or output already held, in whole units), and the
    checkpoints it took and held."""

    num_hit_tokens: int = 0
    num_ideal_tokens: int = 0
    num_prompt_tokens: int = 0
    num_hits: int = 0
    num_checkpoints_taken: int = 0
    num_checkpoints_refused: int = 0
    peak_checkpoint_bytes: int = 0
    peak_cached_pages: int = 0
    num_moves_paid: int = 0  # migrations let run while the short pool held cached units
    num_moves_declined: int = 0  # ... where its cached units were evicted first
    num_units_yielded: int = 0  # cached units evicted so that capacity need not move
    num_stop_checkpoints: int = 0  # taken at output pages in case the request stops there
    num_stop_checkpoints_released: int = 0  # ... and released for a deeper one of its own

    @property
    def hit_rate_vs_ideal(self) -> float:
        """Tokens hit over the ideal's (1.0 when nothing was reusable)."""
        return self.num_hit_tokens / self.num_ideal_tokens if self.num_ideal_tokens else 1.0


class PrefixCache:
    """The scheduler's side of prefix caching: matching a request at admission, where
    its prefill must stop for a checkpoint, taking checkpoints, and evicting when memory
    is short. One `PrefixTree` holds what is cached.

    Args:
        copier: carries out the slot copies (the engine); None to only count them.
        tokens: the requests' token ids (the engine): units are keyed by them
            (`TokenUnits`), not by the specs' content segments, and the ideal is not
            kept (a server's trie of every unit it ever saw would grow without end).
    """

    def __init__(self, tree: PrefixTree, copier: SlotCopier | None = None,
                 tokens: TokenSource | None = None) -> None:  # fmt: skip
        self.tree = tree
        self.copier = copier
        self.tokens = tokens
        # whether a request may stop before its max_tokens (the engine sets it: one with
        # ignore_eos and no stop tokens cannot); None: any may. Stop checkpoints are
        # taken only for requests that may.
        self.may_stop: Callable[[int], bool] | None = None
        self.stats = PrefixStats()
        self.ledger = ReuseLedger(tree.config)
        self._tracked: dict[int, _Tracked] = {}
        self._taken: list[CheckpointCopy] = []
        self._ideal: dict[Hashable, dict] = {}  # type: ignore[type-arg]  # a trie of contents

    # ---- admission ----------------------------------------------------------------------

    def match(self, request_id: int, prompt_tokens: int, content: list[tuple[Hashable, int]],
              total_tokens: int, reads_cache: bool = True) -> tuple[int, list[int]]:  # fmt: skip
        """Match a request being admitted from scratch; it holds its hit locked.

        Args:
            reads_cache: False: the request computes its whole prompt (`RequestSpec.
                reads_prefix_cache`): no hit, as if every checkpoint along it were gone,
                while the pages the tree holds are still known (the request computes
                past them as one whose checkpoint was evicted does).
        Returns:
            The tokens it takes from the cache, and the cached page keys to adopt.
        """
        tree, unit = self.tree, self.tree.unit_tokens
        contents: Sequence[Hashable]
        if self.tokens is not None:
            contents = TokenUnits(self.tokens(request_id), unit, total_tokens // unit)
        else:
            contents = unit_contents(content, total_tokens // unit, unit)
        reusable = contents[: (prompt_tokens - 1) // unit]  # the last prompt token is computed
        found = tree.match(reusable)
        if not reads_cache:
            found = PrefixMatch(tree.root, found.num_matched)
        elif tree.host is not None:
            tree.host.missed(reusable, found.node.depth)
        hit = found.node
        tree.lock(hit)
        if hit.depth:
            tree.touch(hit)
            tree.reused(hit)
        policy = tree.config.policy
        # a prompt's first segment end (``avmp``): speculative unless another rule's too
        boundaries: set[int] = set()
        if policy == "avmp":
            boundaries = segment_boundaries(content, prompt_tokens, unit)
        targets, cuts, stops = self._targets(prompt_tokens, total_tokens, found, boundaries)
        if self.copier is not None and tree.has_state:
            # a copier reads a slot, which holds the state at a step's end only: every
            # checkpoint ends a step (the engine's scans expose no chunk states);
            # vllm-align's prefill chunks end on its blocks anyway (`chunk_limit`)
            cuts = set(targets)
            stops = stops if policy == "vllm-align" else cuts
        tracked = self._tracked[request_id] = _Tracked(contents, hit, targets, cuts)
        tracked.matched = found.num_matched * unit
        tracked.stops = stops
        if policy == "vllm-align" and tree.has_state:
            tracked.align = tree.config.align_tokens
        tracked.last = total_tokens - 1
        may_stop = self.may_stop is None or self.may_stop(request_id)
        if self.tokens is not None and policy == "avmp" and tree.has_state and may_stop:
            tracked.stop_from = max(prompt_tokens, hit.depth * unit + 1)
            tracked.stop_until = tracked.last // unit * unit  # the output's planned end
        tracked.ideal_level = self._ideal
        tracked.prompt = prompt_tokens
        if policy == "avmp" and tree.has_state:
            tracked.speculative = boundaries - {tracked.last // unit * unit,
                                                found.num_matched * unit}  # fmt: skip
            if tree.has_pages:
                tracked.spec_from = hit.depth * unit + self._chunk_end_gap()
        if policy in ("avmp", "vllm-align"):  # the prompt's pages, for requests to come
            end = prompt_tokens // unit * unit
            if hit.depth * unit < end and end not in targets:
                tracked.pages_only.add(end)
                bisect.insort(targets, end)
        if hit.depth and tree.has_state:
            tree.pin(hit)
            tracked.pinned = hit
        return hit.depth * unit, tree.page_keys(hit)

    def admitted(self, request_id: int, prompt_tokens: int, hit_tokens: int) -> None:
        """Count a first admission's hit, and the ideal's: the whole units of its prompt
        (all but the last token) that any request has computed by now, as a cache of
        unbounded memory with a checkpoint at every unit would reuse."""
        stats = self.stats
        stats.num_prompt_tokens += prompt_tokens
        stats.num_hit_tokens += hit_tokens
        stats.num_hits += hit_tokens > 0
        if self.tokens is not None:
            return  # no ideal kept (see the class doc)
        unit = self.tree.unit_tokens
        contents = self._tracked[request_id].contents[: (prompt_tokens - 1) // unit]
        ideal = self._ideal_match(contents) * unit
        assert ideal >= hit_tokens, "a hit the ideal does not count"
        stats.num_ideal_tokens += ideal

    def not_admitted(self, request_id: int) -> None:
        """The admission failed: let go of the hit."""
        self.forget(request_id)

    def _targets(self, prompt_tokens: int, total_tokens: int, found: PrefixMatch,
                 boundaries: set[int] | None = None
                 ) -> tuple[list[int], set[int], set[int]]:  # fmt: skip
        """Token positions past the hit where this request takes a checkpoint (or,
        without state, inserts its path), by the policy; those taken only where a step
        ends exactly; and those where the scheduler ends a prefill chunk.

        ``avmp`` takes the output's end (the next turn's prompt holds this whole stream)
        and the branch point; not the prompt's own end, which would cost every request
        a step before its first token while the output's end serves the next turn (its
        pages go into the tree there, without a checkpoint, so that a request arriving
        meanwhile finds its branch point: `match`). A prompt of several segments also
        keeps the end of its first (``boundaries``: `segment_boundaries`):
        a system prompt or a few-shot template is then checkpointed by the first request
        that computes it, where a branch point is found only by the second.
        ``vllm-align`` keeps a state wherever a step ends on a block (its prefill chunks
        are cut to whole blocks: `chunk_limit`), and ends one at the prompt's last block
        and at the junction: the aligned end of the pages the tree holds along the
        prompt, when it passes the hit by a block or more (vLLM's
        ``num_uncached_common_prefix_tokens``, vllm-project/vllm#37898).
        ``sglang``'s prompt checkpoints come from the chunked scan, without a cut."""
        unit = self.tree.unit_tokens
        last = total_tokens - 1  # the last output token is never fed back
        policy = self.tree.config.policy
        hit = found.node.depth * unit
        if policy == "avmp":
            targets = {last // unit * unit}
            if found.num_matched > found.node.depth:  # the prompt leaves the tree here
                targets.add(found.num_matched * unit)
            targets.update(boundaries or ())
            cuts = stops = set(targets)
        elif policy == "vllm-align":
            align = self.tree.config.align_tokens
            targets = set(range(align, last + 1, align))
            cuts = set(targets)
            stops = {prompt_tokens // align * align}
            junction = found.num_matched * unit // align * align
            if junction - hit >= align:
                stops.add(junction)
        else:
            step = max(SGLANG_PREFILL_INTERVAL_TOKENS, unit) // unit * unit
            targets = set(range(step, prompt_tokens + 1, step))
            decode = -(-SGLANG_DECODE_INTERVAL_TOKENS // unit) * unit
            targets.update(range((prompt_tokens // decode + 1) * decode, last + 1, decode))
            cuts = stops = set()
        kept = sorted(t for t in targets if hit < t <= last and t % unit == 0)
        if not self.tree.has_state:
            return kept, set(), set()
        return kept, cuts & set(kept), stops & set(kept)

    # ---- during the request's life ------------------------------------------------------

    def chunk_limit(self, request_id: int, start: int, num_new: int) -> int:
        """``num_new`` cut so that the chunk ends at the next position where a step must
        end; under ``vllm-align``, a chunk short of it ends on a whole block (vLLM's
        ``_mamba_block_aligned_split``) unless that would leave it empty; under ``avmp``,
        a prefill chunk short of the prompt's end ends on a whole unit (at most a unit's
        tokens of the step's budget given up), where its state can be kept
        (`_chunk_end_checkpoint`)."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return num_new
        if tracked.stops:
            self._drop_speculative(tracked, start)
            for target in tracked.targets:
                if target > start and target in tracked.stops:
                    if start + num_new >= target:
                        return target - start
                    if tracked.align:
                        aligned = (start + num_new) // tracked.align * tracked.align
                        return aligned - start if aligned > start else num_new
                    break
        end = start + num_new
        if tracked.spec_from and end < tracked.prompt:
            aligned = end // self.tree.unit_tokens * self.tree.unit_tokens
            return aligned - start if aligned > start else num_new
        return num_new

    def _drop_speculative(self, tracked: _Tracked, start: int) -> None:
        """Give up a speculative target that the next chunk would stop at while memory
        has no idle room for its checkpoint: no step is cut for a checkpoint that would
        be refused."""
        for target in tracked.targets:
            if target in tracked.stops and target > start:
                if (target in tracked.speculative and self._speculative("segment")
                        and not self._idle_room()):  # fmt: skip
                    tracked.targets.remove(target)
                    tracked.speculative.discard(target)
                    tracked.stops.discard(target)
                    tracked.cuts.discard(target)
                return

    def computed(self, request_id: int, num_computed: int) -> None:
        """The request's cache now holds ``num_computed`` tokens: take the checkpoints
        due up to there (a cut one only exactly there: a swapped-out request resumed
        past it has no state at it)."""
        tracked = self._tracked.get(request_id)
        if tracked is not None and tracked.pinned is not None:  # the step copied it
            self.tree.unpin(tracked.pinned)
            tracked.pinned = None
        if tracked is None:
            return
        if self.tokens is None:
            self._ideal_extend(tracked, num_computed // self.tree.unit_tokens)
        targets = tracked.targets
        while targets and targets[0] <= num_computed:
            target = targets.pop(0)
            if target in tracked.pages_only:
                tracked.node = self.tree.insert(
                    request_id, tracked.contents, tracked.node, target // self.tree.unit_tokens
                )
            elif target == num_computed or target not in tracked.cuts:
                self._take(request_id, tracked, target // self.tree.unit_tokens,
                           self._kind(tracked, target))  # fmt: skip
        unit = self.tree.unit_tokens
        if tracked.spec_from and tracked.spec_from <= num_computed < tracked.prompt and not (
                num_computed % unit):  # fmt: skip
            self._chunk_end_checkpoint(request_id, tracked, num_computed)
        if tracked.stop_from <= num_computed < tracked.stop_until and not num_computed % unit:
            self._stop_checkpoint(request_id, tracked, num_computed // unit)
        elif tracked.stop_node is not None and tracked.node.checkpoint_key is not None:
            self._release_stop_checkpoint(tracked)  # the output's end has its own

    def _kind(self, tracked: _Tracked, target: int) -> str | None:
        """The rule that placed ``target`` (`CHECKPOINT_KINDS`; None for the peers'
        policies, whose eviction learns nothing)."""
        if self.tree.config.policy != "avmp":
            return None
        if target in tracked.speculative:
            return "segment"
        if target == tracked.matched:
            return "branch"
        return "output"

    def _chunk_end_gap(self) -> int:
        """Prefill tokens between speculative checkpoints at chunk ends: those whose KV
        pages weigh one checkpoint, in whole units (Nemotron-H-8B: 3,168; Jamba-1.5-Mini:
        544), so that the checkpoints a long prompt leaves never hold more bytes than its
        pages."""
        tree = self.tree
        units = -(-tree.checkpoint_bytes // max(1, tree.page_bytes))
        return max(1, units) * tree.unit_tokens

    def _chunk_end_checkpoint(self, request_id: int, tracked: _Tracked, position: int) -> None:
        """A prefill chunk ended on a unit at least `_chunk_end_gap` past the request's
        last checkpoint: the state there is in its slot already (no step is cut), so
        keep it speculatively, as vLLM's align mode keeps its chunk ends, for requests
        that share this prompt's first ``position`` tokens (a document, a long
        history whose last part differs, a prompt sent again)."""
        node = tracked.node
        if node.depth * self.tree.unit_tokens != position or node.checkpoint_key is None:
            self._take(request_id, tracked, position // self.tree.unit_tokens, "chunk")
        tracked.spec_from = position + self._chunk_end_gap()

    def _stop_checkpoint(self, request_id: int, tracked: _Tracked, num_units: int) -> None:
        """Checkpoint a decoding request's state at the whole unit it just completed, in
        case it stops on its end-of-sequence token before this next unit ends: ``avmp``
        places a checkpoint at the output's end, planned at the last whole unit of
        prompt + ``max_tokens``, which a request that stops early never reaches, and its
        state at the stop is rarely on a unit boundary. Only for the engine (a trace's
        requests run to their length) and only in free memory: no eviction, no migration
        (`room_shortfall`), so it never displaces what the cache or a request holds. The
        request's previous one is released: this one serves every hit it would."""
        tree = self.tree
        if room_shortfall(tree.allocator, 0, 1) is not None:
            return
        node = tree.insert(request_id, tracked.contents, tracked.node, num_units)
        tracked.node = node
        if node.checkpoint_key is not None:  # another request's: it serves these hits
            self._release_stop_checkpoint(tracked)
            return
        key = tree.allocator.cache_checkpoint()
        if key is None:
            return
        if self.copier is not None:
            self.copier(tree.allocator.units(request_id).slot, tree.allocator.cached_unit(key))
        self._attach(request_id, node, key, kept=False, kind="stop")
        self.stats.num_stop_checkpoints += 1
        self._release_stop_checkpoint(tracked)
        tracked.stop_node = node

    def _release_stop_checkpoint(self, tracked: _Tracked) -> None:
        """Release the request's latest stop checkpoint when a deeper checkpoint on its
        own path, with no branch in between, serves every hit it would (unless a hit
        is about to read it)."""
        previous = tracked.stop_node
        if previous is None or previous is tracked.node:
            return  # none, or still the request's deepest
        tracked.stop_node = None
        if previous.checkpoint_key is None:
            return  # evicted meanwhile
        if id(previous) in self.tree.pinned or not self.tree._dominated(previous):
            return
        self.tree.release_checkpoint(previous)
        self.stats.num_stop_checkpoints_released += 1

    def _take(self, request_id: int, tracked: _Tracked, num_units: int,
              kind: str | None = None) -> None:  # fmt: skip
        """Insert the request's path up to ``num_units`` and checkpoint its end. When
        that end is the request's final state (its stream ends on a unit boundary), the
        checkpoint waits for the request's end (`free`), which keeps its own slot: no
        copy, and no room made for one more slot. Otherwise the state is copied now: the
        slot moves on past the unit boundary. A speculative checkpoint (``kind`` in
        `SPECULATIVE_KINDS`: a place no other request has asked for yet) is taken only
        in memory left idle: it evicts nothing and moves no capacity."""
        tree = self.tree
        node = tree.insert(request_id, tracked.contents, tracked.node, num_units)
        tracked.node = node
        if num_units * tree.unit_tokens == tracked.last:  # its final state: kept at its end
            tracked.pending = tree.has_state and node.checkpoint_key is None
            return
        self._checkpoint(request_id, node, kind)

    def _checkpoint(self, request_id: int, node: PrefixNode, kind: str | None = None
                    ) -> None:  # fmt: skip
        """Copy a live request's state into a new checkpoint at ``node``."""
        tree = self.tree
        if tree.has_state and node.checkpoint_key is None:
            speculative = self._speculative(kind)
            key = self._idle_checkpoint() if speculative else self._new_checkpoint()
            if key is None:
                self.stats.num_checkpoints_refused += 1
            else:
                if self.copier is not None:  # read after the allocation: it may compact
                    allocator = tree.allocator
                    self.copier(allocator.units(request_id).slot, allocator.cached_unit(key))
                self._attach(request_id, node, key, kept=False, kind=kind)
                node.speculative = speculative

    def _speculative(self, kind: str | None) -> bool:
        """Whether a checkpoint of rule ``kind`` is taken only into idle memory and
        evicted first until used: a speculative rule's, unless its reuse promoted it."""
        return kind in SPECULATIVE_KINDS and kind not in self.tree.promoted()

    def _attach(self, request_id: int, node: PrefixNode, key: int, kept: bool,
                kind: str | None = None) -> None:  # fmt: skip
        tree = self.tree
        tree.attach_checkpoint(node, key, kind)
        self.stats.num_checkpoints_taken += 1
        self._taken.append(CheckpointCopy(request_id, key, kept))
        self._note_peaks()

    def _note_peaks(self) -> None:
        tree = self.tree
        held = tree.num_checkpoints * tree.checkpoint_bytes
        self.stats.peak_checkpoint_bytes = max(self.stats.peak_checkpoint_bytes, held)
        self.stats.peak_cached_pages = max(self.stats.peak_cached_pages, tree.num_nodes)

    def _new_checkpoint(self) -> int | None:
        """A checkpoint slot, evicting less valuable cached units if memory is short;
        None where the slot would move capacity that the cache's reuse does not pay for
        (`make_room`)."""
        allocator = self.tree.allocator
        if not self.make_room(0, 1):
            return None
        key = allocator.cache_checkpoint()
        while key is None and self.tree.evict_one(PoolKind.STATE):
            key = allocator.cache_checkpoint()
        return key

    def _idle_checkpoint(self) -> int | None:
        """A checkpoint slot from memory left idle (no eviction, no migration past the
        reserve); None when there is none."""
        return self.tree.allocator.cache_checkpoint() if self._idle_room() else None

    def _idle_room(self) -> bool:
        """Whether one more checkpoint fits without evicting or moving capacity past
        the reserve: AVMP's free chunks and slots (`room_shortfall`), a fixed layout's
        free state capacity."""
        allocator = self.tree.allocator
        if moving_pools(allocator) is not None:
            return room_shortfall(allocator, 0, 1) is None
        usage = allocator.usage()
        return usage.state_capacity_bytes - usage.state_used_bytes >= self.tree.checkpoint_bytes

    def free(self, request_id: int) -> None:
        """Free a finished request; its slot becomes the checkpoint of its final state
        when one is due there (`CacheAllocator.free_keeping_slot`)."""
        tracked = self._tracked.get(request_id)
        node = tracked.node if tracked is not None and tracked.pending else None
        if node is None or node.checkpoint_key is not None:
            self.tree.allocator.free(request_id)
        else:
            key = self.tree.allocator.free_keeping_slot(request_id)
            kind = "output" if self.tree.config.policy == "avmp" else None
            self._attach(request_id, node, key, kept=True, kind=kind)
        if tracked is not None and tracked.stop_node is not None:
            self._release_stop_checkpoint(tracked)  # where the output's end has its own
        self.forget(request_id)

    def forget(self, request_id: int) -> None:
        """The request left memory (finished, preempted, dropped; call after its
        free): unlock its path."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None:
            self.tree.unlock(tracked.node)
            if tracked.pinned is not None:
                self.tree.unpin(tracked.pinned)

    def restore(self, request_id: int) -> CheckpointCopy | None:
        """Copy a just-admitted request's hit into its slot (None: no checkpoint)."""
        hit = self._tracked[request_id].pinned
        if hit is None:
            return None
        allocator = self.tree.allocator
        if hit.checkpoint_key is None:
            assert hit.host_key is not None and self.tree.host is not None, "a pinned hit lost"
            self.tree.host.restore(hit, allocator.units(request_id).slot)
            return CheckpointCopy(request_id, hit.host_key, from_host=True)
        if self.copier is not None:
            self.copier(allocator.cached_unit(hit.checkpoint_key), allocator.units(request_id).slot)
        return CheckpointCopy(request_id, hit.checkpoint_key)

    def use_host_tier(self, tier: HostTier, copier: HostCheckpointCopier | None = None
                      ) -> bool:  # fmt: skip
        """Keep evicted checkpoints in ``tier`` as a second level (`HostLevel`) when the
        config asks for it (``host_level``) and the model has state; returns whether it
        does. ``copier`` carries out the copies (the engine; None: only count them).

        Raises:
            ValueError: the config asks for the host level and ``tier`` has no bytes.
        """
        tree = self.tree
        if tree.config.host_level and not tier.capacity_bytes:
            raise ValueError(
                "the prefix cache's host level keeps checkpoints in the host tier, which "
                "has 0 bytes (preemption 'recompute' or a host tier of 0 leave none)"
            )
        if not tree.config.host_level or not tree.has_state or tree.host is not None:
            return tree.host is not None
        tree.host = HostLevel(tree, tier, copier)
        return True

    def drain_taken(self) -> tuple[CheckpointCopy, ...]:
        """The checkpoints taken since the last call, oldest first."""
        taken, self._taken = tuple(self._taken), []
        return taken

    def served(self, request_id: int) -> None:
        """A request was admitted from scratch (every admission counts, a miss too: the
        ledger's clock). Its reuse is the prefix the tree held of its prompt, hit or not:
        pages matched past the hit are a prefix shared but its checkpoint gone (evicted,
        maybe to spare a migration), which a cache that kept its units would have hit;
        counting only hits, a cache that yields would never see the reuse it lost."""
        tracked = self._tracked[request_id]
        reused = max(tracked.matched, tracked.node.depth * self.tree.unit_tokens)
        self.ledger.admitted(self.tree.flops_of(reused) if reused else 0.0)

    def make_room(self, num_pages: int, num_slots: int) -> bool:
        """Before allocating ``num_pages`` pages and ``num_slots`` slots: if that would
        migrate chunks while the short pool holds cached units, evict those first unless
        the room rule lets capacity move (``reuse``: `ReuseLedger.pays_for`).

        An allocation that would fail outright (both pools short beyond the reserve)
        evicts the short pools' cached units first under either rule but ``migrate``:
        the failed call would evict them anyway (`reclaim`).

        Returns:
            False when the cache's units were evicted first and the allocation would
            still move capacity: a checkpoint is then not taken (a live request's
            allocation goes ahead regardless).
        """
        config = self.tree.config
        if config.room == "migrate":
            return True
        allocator, declined = self.tree.allocator, False
        while True:
            short = room_shortfall(allocator, num_pages, num_slots)
            if short is None:
                return True
            if short.migrates and not declined:
                if not self._holds(short.pool):
                    return True
                if config.room == "reuse" and self.ledger.pays_for(self._move_s(short.num_chunks)):
                    self.stats.num_moves_paid += 1
                    return True
                self.stats.num_moves_declined += 1
                declined = True
            # (a shortfall no migration serves fails the allocation, and cached units go
            # anyway: they go before the failed call)
            if not self.tree.evict_one(short.pool, strict=True):
                return not short.migrates
            self.stats.num_units_yielded += 1

    def _holds(self, pool: PoolKind) -> bool:
        """Whether the tree holds units of ``pool`` (evictable or not)."""
        tree = self.tree
        if pool is PoolKind.KV:
            return tree.has_pages and tree.num_nodes > 0
        return tree.num_checkpoints > 0

    def _move_s(self, num_chunks: int) -> float:
        """What migrating ``num_chunks`` chunks costs: the remaps, and the compaction the
        allocator's migrations have needed per chunk so far."""
        config, stats = self.tree.config, self.tree.allocator.stats
        compacted = stats.num_bytes_compacted / max(1, stats.num_chunks_migrated)
        per_chunk = config.migration_s_per_chunk + compacted / config.compaction_bytes_per_s
        return num_chunks * per_chunk

    def reclaim(self, pool: PoolKind | None = None) -> bool:
        """Evict one cached unit for an allocation that failed (short in ``pool``, if
        known); False when none is left."""
        return self.tree.evict_one(pool)

    def check_integrity(self) -> None:
        held = sum(1 for tracked in self._tracked.values() if tracked.node.depth)
        self.tree.check_integrity(num_live_locks=held)

    # ---- the ideal: an unbounded trie of every unit seen -------------------------------

    def _ideal_match(self, contents: Sequence[Hashable]) -> int:
        level = self._ideal
        for depth, content in enumerate(contents):
            if content not in level:
                return depth
            level = level[content]
        return len(contents)

    def _ideal_extend(self, tracked: _Tracked, num_units: int) -> None:
        """Add a request's computed units to the trie, from where it last stopped."""
        level = tracked.ideal_level
        for content in tracked.contents[tracked.ideal_units : num_units]:
            level = level.setdefault(content, {})
        tracked.ideal_level = level
        tracked.ideal_units = max(tracked.ideal_units, min(num_units, len(tracked.contents)))


def build_prefix_cache(allocator: CacheAllocator, config: PrefixCacheConfig,
                       copier: SlotCopier | None = None, tokens: TokenSource | None = None,
                       ) -> PrefixCache:  # fmt: skip
    """The prefix cache over ``allocator``, sized from its model and layout; ``copier``
    carries out its slot copies and ``tokens`` gives the requests' token ids (the
    engine), None to only count copies and key units by content segments (the simulator).

    Raises:
        ValueError: the budget cannot hold one checkpoint beside one request's slot.
    """
    geometry = allocator.geometry
    unit = allocator.kv_unit_tokens or allocator.config.block_size
    has_state = bool(geometry.recurrent_layers)
    cache_format = allocator.cache_format()
    page_bytes = cache_format.page.unit_bytes * (unit // allocator.config.block_size)
    checkpoint_bytes = cache_format.slot.unit_bytes if has_state else 0
    if has_state and not allocator.could_hold(2, 0):
        raise ValueError(
            f"prefix caching needs room for a checkpoint beside a request's state: "
            f"{geometry.name}'s slot of {checkpoint_bytes} bytes fits fewer than twice in "
            f"{allocator.config.budget_bytes} bytes"
        )
    if config.policy == "vllm-align" and config.align_tokens % unit:
        raise ValueError(f"align_tokens {config.align_tokens} is not whole {unit}-token units")
    tree = PrefixTree(
        allocator, config, unit, has_state,
        lambda n: prefill_flops(geometry, n), page_bytes, checkpoint_bytes,
    )  # fmt: skip
    return PrefixCache(tree, copier, tokens)
