"""The eviction ranking's remembered paths (`PrefixTree._dominated`, `_edge_run`) against
the walks they replace: random sequences of requests, checkpoints, pins, host copies and
evictions drive a tree and a twin that values every candidate by walking the tree, as
the ranking did before; both must evict the same units in the same order."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avmp.memory.host_tier import HostTier
from avmp.memory.registry import make_allocator
from avmp.memory.spec import CacheAllocator, MemoryConfig, PoolKind
from avmp.sched.prefix import (
    HostLevel,
    PrefixCacheConfig,
    PrefixNode,
    PrefixTree,
    _is_dominated,
    build_prefix_cache,
)
from sched_helpers import MIB, tiny_geometry

UNIT = 16  # tokens per page of the AVMP layout


class _WalkingTree(PrefixTree):
    """The ranking's value as it was computed before the paths were remembered: a walk
    down for a checkpoint, a walk up for a leaf's edge."""

    def _value_per_byte(self, node: PrefixNode, whole_edge: bool) -> float:
        tokens = node.depth * self.unit_tokens
        if not whole_edge:
            if _is_dominated(node):
                return 0.0
            return self.flops_of(tokens) / max(1, self.checkpoint_bytes)
        if self.has_state and node.checkpoint_key is None and node.host_key is None:
            return 0.0
        edge = self._edge(node)
        num_bytes = len(edge) * self.page_bytes
        if node.checkpoint_key is not None or node.host_key is not None:
            num_bytes += self.checkpoint_bytes
        start = (node.depth - len(edge)) * self.unit_tokens
        saved = self.flops_of(tokens)
        if not self.has_state:
            saved -= self.flops_of(start)
        return saved / max(1, num_bytes)


def _trees(eviction: str, budget: int, host_checkpoints: int, hybrid: bool = True
           ) -> tuple[PrefixTree, PrefixTree]:  # fmt: skip
    """A tree and its walking twin, each over its own allocator of ``budget`` bytes, with
    a host level of ``host_checkpoints`` checkpoints (0: none) in credit. The tiny
    hybrid's caches (``hybrid`` False: its attention layer alone) with an 8B model's
    FLOPs, so that copying a checkpoint to the host pays."""
    geometry = dataclasses.replace(tiny_geometry(), num_params=8_000_000_000,
                                   num_active_params=8_000_000_000)  # fmt: skip
    if not hybrid:
        geometry = dataclasses.replace(geometry, num_layers=1, recurrent_layers=())
    config = PrefixCacheConfig("avmp", eviction)
    trees = []
    for cls in (PrefixTree, _WalkingTree):
        allocator = make_allocator("avmp", geometry, MemoryConfig(budget))
        built = build_prefix_cache(allocator, config).tree
        tree = cls(allocator, config, built.unit_tokens, built.has_state, built.flops_of,
                   built.page_bytes, built.checkpoint_bytes)  # fmt: skip
        if host_checkpoints and hybrid:
            tree.host = HostLevel(tree, HostTier(host_checkpoints * tree.checkpoint_bytes))
            # a level whose copies have paid so far: it keeps every checkpoint worth a
            # copy (how it earns that is tests/sched/test_prefix_host_level.py's)
            tree.host.saved_s = 1e9
        trees.append(tree)
    return trees[0], trees[1]


def _contents(stream: list[int]) -> list[Hashable]:
    """A unit's content is the whole stream up to it: streams over a small alphabet share
    prefixes and branch often."""
    return [tuple(stream[: i + 1]) for i in range(len(stream))]


def _checkpointed(tree: PrefixTree) -> list[PrefixNode]:
    """Nodes holding a device checkpoint, in an order both twins agree on."""
    found, stack = [], list(tree.root.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.checkpoint_key is not None:
            found.append(node)
    return sorted(found, key=lambda n: str(n.content))


class _Twin:
    """One tree driven as the prefix cache drives it: live requests lock their paths,
    checkpoints are taken along them, a failed allocation evicts and retries."""

    def __init__(self, tree: PrefixTree) -> None:
        self.tree = tree
        self.allocator: CacheAllocator = tree.allocator
        self.live: list[tuple[int, PrefixNode]] = []
        self.pinned: list[tuple[int, PrefixNode]] = []  # (request, node): a hit's copy to come
        self.evicted: list[tuple[Hashable, bool, bool]] = []  # (content, page, checkpoint)

    def evict(self, pool: PoolKind | None, strict: bool = False) -> bool:
        before = self._cached()
        evicted = self.tree.evict_one(pool, strict)
        after = self._cached()
        self.evicted += sorted(before - after)  # what went, so the twins' orders compare
        return evicted

    def _cached(self) -> set[tuple[Hashable, bool, bool]]:
        units, stack = set(), list(self.tree.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            units.add((node.content, True, False))
            if node.checkpoint_key is not None:
                units.add((node.content, False, True))
        return units

    def request(self, request_id: int, stream: list[int], checkpoints: set[int],
                stays: bool) -> None:  # fmt: skip
        while self.allocator.admit(request_id, len(stream) * UNIT) is None:
            if not self.evict(PoolKind.KV):
                return
        contents, node = _contents(stream), self.tree.root
        self.tree.lock(node)
        for depth in range(1, len(stream) + 1):
            node = self.tree.insert(request_id, contents, node, depth)
            if depth in checkpoints:
                self._checkpoint(node)
        if stays:
            self.live.append((request_id, node))
        else:
            self._end(request_id, node)

    def _checkpoint(self, node: PrefixNode) -> None:
        if not self.tree.has_state:
            return
        key = self.allocator.cache_checkpoint()
        while key is None and self.evict(PoolKind.STATE):
            key = self.allocator.cache_checkpoint()
        if key is not None and not self.tree.attach_checkpoint(node, key):
            self.allocator.release_cached(key)

    def _end(self, request_id: int, node: PrefixNode) -> None:
        for pinned in [p for p in self.pinned if p[0] == request_id]:
            self.pinned.remove(pinned)
            self.tree.unpin(pinned[1])
        self.tree.unlock(node)
        self.allocator.free(request_id)

    def finish(self, index: int) -> None:
        if self.live:
            self._end(*self.live.pop(index % len(self.live)))

    def match(self, stream: list[int]) -> None:
        hit = self.tree.match(_contents(stream)).node
        if hit is not self.tree.root:
            self.tree.touch(hit)

    def release(self, index: int) -> None:
        nodes = [n for n in _checkpointed(self.tree) if id(n) not in self.tree.pinned]
        if nodes:
            self.tree.release_checkpoint(nodes[index % len(nodes)])

    def pin(self, index: int) -> None:
        """Pin a checkpoint on a live request's path, as a hit is pinned until its copy
        (the request holds the path, so the pinned node is never a leaf to evict)."""
        if not self.live:
            return
        request_id, node = self.live[index % len(self.live)]
        held = [n for n in node.path() if n.checkpoint_key is not None]
        if held:
            self.tree.pin(held[index % len(held)])
            self.pinned.append((request_id, held[index % len(held)]))

    def unpin(self, index: int) -> None:
        if self.pinned:
            self.tree.unpin(self.pinned.pop(index % len(self.pinned))[1])

    def state(self) -> list[tuple[Any, ...]]:
        rows, stack = [], list(self.tree.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            rows.append((node.content, node.checkpoint_key is not None,
                         node.host_key is not None, node.num_locks, node.last_use))  # fmt: skip
        return sorted(rows)


_streams = st.lists(st.integers(0, 2), min_size=1, max_size=12)
_requests = st.tuples(st.just("request"), _streams, st.sets(st.integers(1, 12), max_size=4),
                      st.booleans())  # fmt: skip
_ops = st.one_of(
    _requests,
    _requests,
    _requests,
    st.tuples(st.just("finish"), st.integers(0, 7)),
    st.tuples(st.just("match"), _streams),
    st.tuples(
        st.just("evict"), st.sampled_from([None, PoolKind.KV, PoolKind.STATE]), st.booleans()
    ),
    st.tuples(st.just("release"), st.integers(0, 7)),
    st.tuples(st.just("pin"), st.integers(0, 7)),
    st.tuples(st.just("unpin"), st.integers(0, 7)),
)


def _values(tree: PrefixTree) -> list[tuple[Hashable, bool, float]]:
    return sorted((node.content, whole, tree._value_per_byte(node, whole))
                  for node, whole in tree._candidates())  # fmt: skip


def _apply(twin: _Twin, op: tuple[Any, ...], request_id: int) -> None:
    name, *args = op
    if name == "request":
        stream, checkpoints, stays = args
        twin.request(request_id, stream, checkpoints, stays)
    elif name == "evict":
        twin.evict(*args)
    else:
        getattr(twin, name)(*args)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_ops, min_size=20, max_size=80), eviction=st.sampled_from(["flops", "lru"]),
       budget_mib=st.sampled_from([4, 6]), host_checkpoints=st.sampled_from([0, 1, 3]),
       hybrid=st.booleans())  # fmt: skip
def test_remembered_paths_evict_as_the_walks_did(
    ops: list[tuple[Any, ...]],
    eviction: str,
    budget_mib: int,
    host_checkpoints: int,
    hybrid: bool,
) -> None:
    tree, walking = _trees(eviction, budget_mib * MIB, host_checkpoints, hybrid)
    twin, reference = _Twin(tree), _Twin(walking)
    for request_id, op in enumerate(ops):
        _apply(twin, op, request_id)
        _apply(reference, op, request_id)
        assert twin.evicted == reference.evicted
        assert twin.state() == reference.state()
        assert _values(tree) == _values(walking)  # as a ranking now would value them
        tree.check_integrity(num_live_locks=len(twin.live))


def test_a_lock_shortens_a_remembered_edge_and_its_release_restores_it() -> None:
    """A stream of 8 units, checkpointed at its end: its leaf's edge is all 8 pages. A
    live request on its first 3 units keeps them (the edge is 5), and the edge is 8
    again once it ends; a checkpoint at unit 6 cuts it to 2 and dominates unit 4 (the
    path below runs unbranched to it), until a stream branches off at unit 4. The
    checkpoint at 6 stays dominated by the one at 8."""
    tree, _ = _trees("flops", 64 * MIB, 0)
    twin = _Twin(tree)
    twin.request(0, [0] * 8, {8}, stays=False)
    (leaf,) = (c[0] for c in tree._candidates())

    def edge() -> int:
        assert leaf.parent is not None
        length = 1 + tree._edge_run(leaf.parent)
        assert length == len(tree._edge(leaf))
        return length

    assert edge() == 8
    twin.request(1, [0] * 3, set(), stays=True)
    assert edge() == 5
    twin.finish(0)
    assert edge() == 8
    twin.request(2, [0] * 6, {6}, stays=False)
    middle = leaf.path()[5]
    assert edge() == 2 and tree._dominated(leaf.path()[3])
    twin.request(3, [0] * 4 + [1], set(), stays=False)
    assert not tree._dominated(leaf.path()[3]) and tree._dominated(middle)
    tree.check_integrity()


def test_a_host_checkpoint_dropped_lengthens_the_edge_below_it() -> None:
    """An inner checkpoint moved to the host level ends the edge of the leaf below it
    (its pages stand for that host copy); once the host tier drops it (room for a
    swapped-out request), the edge runs to the root again."""
    tree, _ = _trees("flops", 64 * MIB, 3)
    twin = _Twin(tree)
    twin.request(0, [0] * 4, {2}, stays=False)
    assert twin.evict(PoolKind.STATE)  # the only checkpoint: kept in the host tier
    inner = tree.root.children[(0,)].children[(0, 0)]
    assert inner.host_key is not None and inner.checkpoint_key is None
    twin.request(1, [0] * 4, {4}, stays=False)
    leaf = inner.children[(0, 0, 0)].children[(0, 0, 0, 0)]
    assert leaf.parent is not None and 1 + tree._edge_run(leaf.parent) == 2
    assert tree.host is not None and tree.host.reclaim()
    assert inner.host_key is None and 1 + tree._edge_run(leaf.parent) == 4
    tree.check_integrity()
