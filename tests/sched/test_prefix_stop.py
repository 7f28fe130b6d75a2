"""Stop checkpoints (`PrefixCache.computed`): with units keyed by token ids, as the
engine keys them, a request that stops before ``max_tokens`` leaves a checkpoint at
the last whole unit it computed, holding exactly that prefix's state, and the next
turn resumes there; one that runs to its end keeps only its planned output end's."""

from __future__ import annotations

import pytest

from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.sched.prefix import PrefixCacheConfig
from avmp.sched.request import RequestSpec
from avmp.sched.scheduler import Scheduler, SchedulerConfig
from sched_helpers import tiny_geometry

MIB = 1 << 20
MAX_TOKENS = 40


class _Streams:
    """The engine's side, stood in for: each request's token ids (its prompt, then one
    token per sampled step, each a function of the tokens before it) and what each slot
    holds (the tokens its state has consumed), moved by the prefix cache's copies."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.slots: dict[int, tuple[int, ...]] = {}

    def copy(self, src: int, dst: int) -> None:
        self.slots[dst] = self.slots[src]

    def source(self, request_id: int) -> list[int]:
        return self.tokens[request_id]

    @staticmethod
    def next_token(tokens: list[int]) -> int:
        return (sum(tokens[-3:]) * 31 + len(tokens)) % 997 + 3


def _scheduler(layout: str, streams: _Streams) -> Scheduler:
    allocator = make_allocator(layout, tiny_geometry(), MemoryConfig(64 * MIB))
    config = SchedulerConfig(max_num_batched_tokens=256, prefix_cache=PrefixCacheConfig("avmp"))
    return Scheduler(allocator, config, slot_copier=streams.copy, token_source=streams.source)


def _serve(scheduler: Scheduler, streams: _Streams, request_id: int, prompt: list[int],
           stop_after: int) -> tuple[list[int], int]:  # fmt: skip
    """Run one request alone until it has sampled ``stop_after`` tokens (its last one
    then ends it, as an end-of-sequence token would) or ``MAX_TOKENS``; returns its
    output and where its first chunk started (its hit)."""
    streams.tokens[request_id] = list(prompt)
    scheduler.add_request(RequestSpec(request_id, 0.0, len(prompt), MAX_TOKENS))
    start = None
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        for copy in plan.restored:  # a hit's slot holds exactly the tokens it skips
            slot = scheduler.allocator.units(copy.request_id).slot
            (chunk,) = plan.chunks
            assert streams.slots[slot] == tuple(streams.tokens[request_id][: chunk.start])
        for chunk in plan.chunks:
            start = chunk.start if start is None else start
            slot = scheduler.allocator.units(chunk.request_id).slot
            streams.slots[slot] = tuple(streams.tokens[request_id][: chunk.context_tokens])
        tokens = streams.tokens[request_id]
        samples = plan.chunks[0].context_tokens == len(tokens)
        stopped = [request_id] if samples and len(tokens) - len(prompt) + 1 == stop_after else []
        outcome = scheduler.finish_step(plan, stopped)
        for taken in outcome.checkpointed:  # every checkpoint: its node's exact prefix
            held = streams.slots[scheduler.allocator.cached_unit(taken.key)]
            assert held == tuple(tokens[: len(held)])
            assert len(held) % scheduler.prefix.tree.unit_tokens == 0  # type: ignore[union-attr]
        if request_id in outcome.emitted:
            tokens.append(_Streams.next_token(tokens))
        scheduler.check_integrity()
    assert start is not None
    return streams.tokens[request_id][len(prompt) :], start


@pytest.mark.parametrize("layout", ["avmp", "static", "oracle"])
def test_a_stopped_answer_leaves_its_last_whole_unit(layout: str) -> None:
    streams = _Streams()
    scheduler = _scheduler(layout, streams)
    prefix = scheduler.prefix
    assert prefix is not None
    unit = prefix.tree.unit_tokens
    prompt = [5 + (7 * i) % 50 for i in range(37)]
    output, _ = _serve(scheduler, streams, 0, prompt, stop_after=21)
    assert len(output) == 21  # it stopped; its state holds 37 + 20 tokens
    computed = len(prompt) + len(output) - 1
    assert prefix.stats.num_stop_checkpoints > 0
    # one checkpoint left at the stream's last whole unit; the earlier ones released
    assert prefix.tree.num_checkpoints == 1
    assert prefix.stats.num_stop_checkpoints_released == prefix.stats.num_stop_checkpoints - 1
    second = prompt + output + [9, 8, 7, 6, 5]
    _, start = _serve(scheduler, streams, 1, second, stop_after=MAX_TOKENS)
    assert start == computed // unit * unit > len(prompt)


def test_an_answer_that_runs_to_its_end_keeps_only_the_planned_checkpoint() -> None:
    streams = _Streams()
    scheduler = _scheduler("avmp", streams)
    prefix = scheduler.prefix
    assert prefix is not None
    prompt = [5 + (3 * i) % 40 for i in range(29)]
    output, _ = _serve(scheduler, streams, 0, prompt, stop_after=MAX_TOKENS + 1)
    assert len(output) == MAX_TOKENS
    stats = prefix.stats
    assert stats.num_stop_checkpoints > 0
    assert stats.num_stop_checkpoints_released == stats.num_stop_checkpoints
    assert prefix.tree.num_checkpoints == 1 and prefix.tree.num_evicted_checkpoints == 0


def test_the_simulator_takes_none() -> None:
    """Without token ids (a trace's requests, which run to their length) no stop
    checkpoint is taken."""
    allocator = make_allocator("avmp", tiny_geometry(), MemoryConfig(64 * MIB))
    config = SchedulerConfig(max_num_batched_tokens=256, prefix_cache=PrefixCacheConfig("avmp"))
    scheduler = Scheduler(allocator, config)
    scheduler.add_request(RequestSpec(0, 0.0, 37, MAX_TOKENS, (("p", 37),), "a"))
    while scheduler.has_unfinished:
        scheduler.finish_step(scheduler.schedule())
    assert scheduler.prefix is not None and scheduler.prefix.stats.num_stop_checkpoints == 0
    assert scheduler.prefix.tree.num_checkpoints == 1
