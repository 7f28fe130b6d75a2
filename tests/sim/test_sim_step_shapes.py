"""The simulator tells a caller each step's shape and time (`simulate(on_step=...)`), which
the engine benchmarks set beside the engine's own steps."""

from __future__ import annotations

import pytest

from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.sched.request import RequestSpec
from avmp.sim.simulator import SimConfig, simulate
from avmp.sim.timing import BatchShape
from sched_helpers import MIB, tiny_geometry


def test_each_step_reports_the_shape_and_seconds_it_was_charged() -> None:
    """Three prompts in a budget small enough to preempt: one report per step, the
    steps' prefill tokens are the trace's with the recompute on top, decode steps are
    graph steps, and the reported seconds are the clock's compute phases."""
    geometry = tiny_geometry()
    specs = [RequestSpec(i, 0.001 * i, 300, 400) for i in range(3)]
    allocator = make_allocator("avmp", geometry, MemoryConfig(6 * MIB))
    steps: list[tuple[BatchShape, float]] = []
    config = SimConfig(allocator_calls_path=None, max_num_batched_tokens=256,
                       preemption="recompute", admission="greedy")  # fmt: skip
    result = simulate(specs, allocator, geometry, config,
                      on_step=lambda shape, s: steps.append((shape, s)))  # fmt: skip
    assert result.num_preemptions > 0 and result.num_completed == 3
    assert len(steps) == result.num_steps
    prefill = sum(shape.num_prefill_tokens for shape, _ in steps)
    # recompute on top; a resumed request may also prefill the token it had sampled last
    fresh = prefill - 3 * 300 - result.num_recompute_tokens
    assert 0 <= fresh <= result.num_preemptions
    assert sum(s for _, s in steps) == pytest.approx(
        result.phase_s["compute"] + result.phase_s["recompute"]
    )
    for shape, _ in steps:
        assert (shape.num_graph_rows > 0) == (shape.num_prefill_tokens == 0)
