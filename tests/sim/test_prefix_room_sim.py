"""The prefix cache costs nothing in the simulator where nothing is shared (ShareGPT first
turns on Nemotron-H-8B at 8 GiB, the cell where migrating first cost 0.15% of req/s), and
keeps what it wins where prefixes are shared."""

from __future__ import annotations

import dataclasses

import pytest

from avmp.bench.workloads import make_prefix_workload, make_workload
from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.models.zoo import resolve_model
from avmp.sched.request import RequestSpec
from avmp.sim.simulator import SimConfig, SimResult, simulate

GIB = 1 << 30


def _run(specs: list[RequestSpec], prefix_cache: str) -> tuple[SimResult, int]:
    geometry = resolve_model("nemotron-h-8b")
    allocator = make_allocator("avmp", geometry, MemoryConfig(8 * GIB))
    config = SimConfig(profile="h200", prefix_cache=prefix_cache, timeline_samples=0)
    result = simulate(specs, allocator, geometry, config)
    return result, allocator.stats.num_chunks_migrated


@pytest.fixture
def migrate_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule before: capacity always moves before cached units go."""
    original = SimConfig.prefix_cache_config

    def migrating(self: SimConfig, *args: object, **kwargs: object) -> object:
        config = original(self, *args, **kwargs)  # type: ignore[arg-type]
        return None if config is None else dataclasses.replace(config, room="migrate")

    monkeypatch.setattr(SimConfig, "prefix_cache_config", migrating)


def test_without_reuse_the_cache_moves_no_capacity() -> None:
    specs = make_workload("sharegpt_replay", 0, 256)
    off, moved_off = _run(specs, "off")
    on, moved_on = _run(specs, "avmp")
    assert on.prefix["num_hit_tokens"] == 0
    assert moved_on == moved_off
    assert on.request_throughput == off.request_throughput
    assert on.ttft_p99_s == off.ttft_p99_s


@pytest.mark.usefixtures("migrate_first")
def test_migrating_first_was_what_cost_throughput() -> None:
    """The same cell with the old rule: the cache's hold makes capacity move."""
    specs = make_workload("sharegpt_replay", 0, 256)
    off, moved_off = _run(specs, "off")
    on, moved_on = _run(specs, "avmp")
    assert moved_on > moved_off
    assert on.request_throughput < off.request_throughput


def test_with_reuse_the_cache_keeps_its_hits() -> None:
    """Multi-turn conversations: hits as many as when capacity always moves first."""
    specs = make_prefix_workload("multi_turn_prefix", 0, 256)
    on, _ = _run(specs, "avmp")
    assert on.prefix["num_hit_tokens"] > 0
    with pytest.MonkeyPatch.context() as patch:
        original = SimConfig.prefix_cache_config
        patch.setattr(
            SimConfig, "prefix_cache_config",
            lambda self, *a: dataclasses.replace(original(self, *a), room="migrate"),
        )  # fmt: skip
        before, _ = _run(specs, "avmp")
    assert on.prefix["num_hit_tokens"] >= before.prefix["num_hit_tokens"]
    assert on.request_throughput >= before.request_throughput
