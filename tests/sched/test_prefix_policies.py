"""The placement and eviction rules of the prefix cache, each against its reason:
vLLM's align mode as it ships (whole-block prefill chunks, its Marconi-style junction),
and a checkpoint that a deeper one on an unbranched path makes worthless goes first."""

from __future__ import annotations

from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig, PoolKind
from avmp.sched.prefix import (
    DEMOTE_AFTER,
    PrefixCacheConfig,
    PrefixNode,
    PrefixTree,
    build_prefix_cache,
    segment_boundaries,
)
from avmp.sched.request import RequestSpec
from avmp.sched.scheduler import Scheduler, SchedulerConfig, StepPlan
from sched_helpers import run_to_end, tiny_geometry

MIB = 1 << 20
ALIGN = 64


def _vllm(max_batched: int = 256) -> Scheduler:
    allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(64 * MIB))
    prefix = PrefixCacheConfig("vllm-align", "lru", align_tokens=ALIGN)
    config = SchedulerConfig(max_num_batched_tokens=max_batched, prefix_cache=prefix)
    return Scheduler(allocator, config)


def _chunk_ends(plans: list[StepPlan], request_id: int) -> list[int]:
    return [c.start + c.num_tokens for p in plans for c in p.chunks if c.request_id == request_id]


def _one_by_one(scheduler: Scheduler, specs: list[RequestSpec]) -> list[StepPlan]:
    plans: list[StepPlan] = []
    for spec in specs:
        scheduler.add_request(spec)
        plans += run_to_end(scheduler)
    return plans


def test_vllm_align_cuts_prefill_chunks_to_whole_blocks() -> None:
    """A 600-token prompt under a 150-token step budget: vLLM rounds each chunk down to
    whole blocks (128 tokens), ends one at the prompt's last block (576), then prefills
    the tail; each block-aligned chunk end keeps a state."""
    scheduler = _vllm(max_batched=150)
    plans = _one_by_one(scheduler, [RequestSpec(0, 0.0, 600, 3)])
    assert _chunk_ends(plans, 0)[:6] == [128, 256, 384, 512, 576, 600]
    again = RequestSpec(1, 0.0, 600, 3, ((("prompt", 0), 600),))  # the same prompt
    assert _first_starts(_one_by_one(scheduler, [again]))[1] == 576


def _first_starts(plans: list[StepPlan]) -> dict[int, int]:
    starts: dict[int, int] = {}
    for plan in plans:
        for chunk in plan.chunks:
            starts.setdefault(chunk.request_id, chunk.start)
    return starts


def test_vllm_align_takes_the_junction_as_vllm_37898_does() -> None:
    """vllm#45238's shape: 150 shared tokens, then a unique part; the prompt's last
    block falls in the unique part, so the first request keeps no state in the shared
    part. The second sees the first's KV pages along 144 tokens (whole pages) and ends a
    chunk at their last whole block (128): the third resumes there."""
    scheduler = _vllm()
    specs = [RequestSpec(i, 0.0, 250, 3, (("doc", 150), (("unique", i), 100)))
             for i in range(3)]  # fmt: skip
    plans = _one_by_one(scheduler, specs)
    assert 128 not in _chunk_ends(plans, 0) and 128 in _chunk_ends(plans, 1)
    assert _first_starts(plans) == {0: 0, 1: 0, 2: 128}


def test_vllm_align_takes_no_junction_short_of_a_block() -> None:
    scheduler = _vllm()
    specs = [RequestSpec(i, 0.0, 250, 3, (("doc", 60), (("unique", i), 190)))
             for i in range(3)]  # fmt: skip
    assert set(_first_starts(_one_by_one(scheduler, specs)).values()) == {0}


def _chain(tree: PrefixTree, allocator: object, request_id: int, depth: int,
           checkpoints: tuple[int, ...]) -> PrefixNode:  # fmt: skip
    """Insert ``depth`` units of a live request's stream, checkpoints at the given
    depths, and let the request go (its pages stay in the tree)."""
    admitted = allocator.admit(request_id, depth * 16)  # type: ignore[attr-defined]
    assert admitted is not None
    node = tree.root
    tree.lock(node)
    for d in range(1, depth + 1):
        node = tree.insert(request_id, [("stream", request_id, i) for i in range(d)], node)
        if d in checkpoints:
            key = allocator.cache_checkpoint()  # type: ignore[attr-defined]
            assert key is not None and tree.attach_checkpoint(node, key)
    tree.unlock(node)
    allocator.free(request_id)  # type: ignore[attr-defined]
    return node


def test_a_checkpoint_without_a_branch_below_before_a_deeper_one_saves_nothing() -> None:
    """A stream with checkpoints at depths 4 and 8 and nothing branching between: every
    request that passed depth 4 went on to depth 8, so by FLOPs per byte the depth-4
    checkpoint is worth nothing (and goes before checkpoints that save work). A second
    stream leaving the path at depth 6 makes it a hit again for what branches there."""
    allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(64 * MIB))
    tree = build_prefix_cache(allocator, PrefixCacheConfig("avmp", "flops")).tree
    deep = _chain(tree, allocator, 1, 8, (4, 8))
    inner = deep.path()[3]
    leaf_of_two = _chain(tree, allocator, 2, 2, (2,))  # another stream, shallow
    assert tree._value_per_byte(inner, whole_edge=False) == 0.0
    assert tree._value_per_byte(leaf_of_two, whole_edge=True) > 0.0
    assert tree.evict_one(PoolKind.STATE) and inner.checkpoint_key is None
    key = allocator.cache_checkpoint()
    assert key is not None and tree.attach_checkpoint(inner, key)
    _branch(tree, allocator, 3)
    assert tree._value_per_byte(inner, whole_edge=False) > 0.0
    tree.check_integrity()


def _branch(tree: PrefixTree, allocator: object, request_id: int) -> None:
    """A stream that follows the first 6 units of stream 1's path and then leaves it,
    without checkpoint."""
    contents = [("stream", 1, i) for i in range(6)] + [("other", request_id)]
    assert allocator.admit(request_id, len(contents) * 16) is not None  # type: ignore[attr-defined]
    tree.lock(tree.root)
    node = tree.insert(request_id, contents, tree.root)
    tree.unlock(node)
    allocator.free(request_id)  # type: ignore[attr-defined]


def _avmp(budget: int = 64 * MIB) -> Scheduler:
    allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(budget))
    config = SchedulerConfig(prefix_cache=PrefixCacheConfig("avmp", "flops"))
    return Scheduler(allocator, config)


def _few_shot(request_id: int, template: int = 150) -> RequestSpec:
    return RequestSpec(request_id, 0.0, template + 60, 3,
                       (("template", template), (("question", request_id), 60)))  # fmt: skip


def test_avmp_checkpoints_a_first_segment_end_before_any_request_shares_it() -> None:
    """A few-shot template of 150 tokens and a question: the first request ends a
    chunk at the template's last whole page (144) and keeps a checkpoint there, so the
    second resumes from it (without the rule the second found only a branch point,
    which it checkpointed for the third)."""
    scheduler = _avmp()
    plans = _one_by_one(scheduler, [_few_shot(0), _few_shot(1)])
    assert 144 in _chunk_ends(plans, 0)
    assert _first_starts(plans) == {0: 0, 1: 144}
    assert scheduler.prefix is not None
    scheduler.prefix.check_integrity()


def test_the_first_segment_end_rule_ignores_prompts_of_one_segment_and_short_heads() -> None:
    assert segment_boundaries((("a", 300),), 300, 16) == set()
    assert segment_boundaries((("a", 10), ("b", 300)), 310, 16) == set()  # no whole page
    assert segment_boundaries((("a", 300), ("b", 1)), 301, 16) == set()  # the prompt's end
    assert segment_boundaries((("a", 100), ("b", 100), ("c", 100)), 300, 16) == {96}


def test_a_speculative_checkpoint_evicts_nothing() -> None:
    """Idle slots all held by earlier requests' checkpoints: the template's end, which no
    request has asked for yet, is not kept (it would evict a cached checkpoint or move
    capacity), and the second request finds the template only as a branch point."""
    scheduler = _avmp(budget=6 * MIB)
    for i in range(7):  # each leaves its output's end checkpointed
        scheduler.add_request(RequestSpec(100 + i, 0.0, 40, 9))
        run_to_end(scheduler)
    assert scheduler.prefix is not None
    stats = scheduler.prefix.stats
    assert scheduler.prefix.tree.num_checkpoints == 7 and stats.num_checkpoints_refused == 0
    plans = _one_by_one(scheduler, [_few_shot(0), _few_shot(1)])
    assert stats.num_checkpoints_refused == 1
    assert _first_starts(plans) == {0: 0, 1: 0}
    scheduler.prefix.check_integrity()


def test_avmp_keeps_prefill_chunk_ends_on_whole_pages_for_later_requests() -> None:
    """A 600-token prompt under a 100-token step budget: its chunks end on whole pages
    (96, 192, ...), and where a chunk ends at least a checkpoint's worth of pages (256
    tokens here) past the last checkpoint its state is kept, speculatively: a later
    prompt sharing only the first 300 tokens resumes at 288 (the branch point alone
    would have served only a third request)."""
    allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(64 * MIB))
    prefix = PrefixCacheConfig("avmp", "flops")
    scheduler = Scheduler(allocator, SchedulerConfig(max_num_batched_tokens=100,
                                                     prefix_cache=prefix))  # fmt: skip
    specs = [RequestSpec(i, 0.0, 600, 3, (("a", 10), ("doc", 290), (("own", i), 300)))
             for i in range(2)]  # fmt: skip
    plans = _one_by_one(scheduler, specs)
    assert _chunk_ends(plans, 0)[:6] == [96, 192, 288, 384, 480, 576]
    assert _first_starts(plans) == {0: 0, 1: 288}
    assert scheduler.prefix is not None
    scheduler.prefix.check_integrity()


def test_a_placement_rule_that_is_never_reused_is_demoted() -> None:
    """Checkpoints of a rule requests hardly resume from (answers' ends on a trace whose
    next prompts do not repeat the answers) go before those of a rule that pays, once
    both rules have taken `DEMOTE_AFTER` checkpoints; a checkpoint resumed from is
    proven whatever its rule."""
    for proven in (False, True):
        allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(64 * MIB))
        tree = build_prefix_cache(allocator, PrefixCacheConfig("avmp", "flops")).tree
        shallow = _chain(tree, allocator, 2, 2, ())
        deep = _chain(tree, allocator, 1, 8, ())  # worth more by FLOPs per byte, newer
        for node, kind in ((deep, "output"), (shallow, "branch")):
            key = allocator.cache_checkpoint()
            assert key is not None and tree.attach_checkpoint(node, key, kind)
        assert tree.demoted() == frozenset()  # too few taken to judge
        tree.kinds_taken.update(output=DEMOTE_AFTER, branch=DEMOTE_AFTER)
        tree.kinds_reused.update(output=3, branch=40)
        assert tree.demoted() == {"output"}
        if proven:
            tree.reused(deep)
            assert deep.kind is None and tree.kinds_reused["output"] == 4
        assert tree.evict_one(PoolKind.STATE)
        assert (deep.checkpoint_key is None) is not proven
        assert (shallow.checkpoint_key is None) is proven
        tree.check_integrity()


def test_a_speculative_rule_that_pays_is_promoted() -> None:
    """Chunk ends resumed from half as often as the best rule's checkpoints, or more:
    taken like the others (they may evict), not only into idle memory; a rule that is
    not speculative is never 'promoted', and nothing is before any reuse."""
    allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(64 * MIB))
    cache = build_prefix_cache(allocator, PrefixCacheConfig("avmp", "flops"))
    tree = cache.tree
    tree.kinds_taken.update(output=DEMOTE_AFTER, chunk=DEMOTE_AFTER, segment=DEMOTE_AFTER)
    assert tree.promoted() == frozenset() and cache._speculative("chunk")
    tree.kinds_reused.update(output=40, chunk=20, segment=19)
    assert tree.promoted() == {"chunk"}
    assert not cache._speculative("chunk") and cache._speculative("segment")
    assert not cache._speculative("output")
