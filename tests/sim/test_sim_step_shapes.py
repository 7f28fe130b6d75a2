"""The simulator tells a caller each step's shape and time (`simulate(on_step=...)`), which
the engine benchmarks set beside the engine's own steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.sched.request import RequestSpec
from avmp.sim.simulator import SimConfig, StepCallback, simulate
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


def test_an_engine_that_captured_mixed_steps_is_simulated_with_mixed_graphs(
    tmp_path: Path,
) -> None:
    """A calibration whose points include prefill steps run as graphs: the simulator
    runs prefill and mixed steps on their token buckets' graphs; one without them runs
    every such step eagerly."""
    geometry = tiny_geometry()
    specs = [RequestSpec(i, 0.001 * i, 100 + 50 * i, 20) for i in range(4)]
    rows = []
    for graphed in (False, True):
        points = [
            {"num_prefill_tokens": p, "num_decode_requests": d, "num_context_tokens": c,
             "num_requests": r, "step_s": 0.002 + 1e-5 * p + 2e-5 * d + 1e-8 * c,
             "graph": int(d > 0 and p == 0 or graphed and p > 0),
             **({"num_padded_tokens": 2 * (p + d)} if graphed and p > 0 else {})}
            for p, d, c, r in ((512, 0, 512, 1), (0, 8, 4000, 8), (0, 32, 9000, 32),
                               (100, 4, 3000, 5), (2048, 0, 2048, 2), (0, 1, 700, 1),
                               (30, 9, 5000, 10))
        ]  # fmt: skip
        path = tmp_path / f"cal_{graphed}.json"
        path.write_text(json.dumps({"gpu": "test", "points": points}))
        allocator = make_allocator("avmp", geometry, MemoryConfig(64 * MIB))
        config = SimConfig(allocator_calls_path=None, calibration=str(path),
                           max_num_batched_tokens=256)  # fmt: skip
        steps: list[BatchShape] = []
        simulate(specs, allocator, geometry, config, on_step=_collect(steps))
        rows.append([s.num_graph_rows for s in steps if s.num_prefill_tokens])
    eager, graphs = rows
    assert eager and not any(eager)
    assert graphs and all(padded in (16, 32, 64, 128, 256) for padded in graphs)


def _collect(shapes: list[BatchShape]) -> StepCallback:
    return lambda shape, _seconds: shapes.append(shape)
